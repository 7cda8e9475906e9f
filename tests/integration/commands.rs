//! The operator commands `keter check`, `render`, `bundle` and `status`: their output and exit
//! codes, and a bundle packed by `keter bundle` deployed by a real daemon.

use std::fs;

use serde_json::Value;

use crate::status::{WAIT, keter_cmd, wait_state};
use crate::support::*;

#[test]
fn check_render_bundle_and_status_commands() {
    let dir = TempDir::new("status-commands");
    // A bundle folder with the example app.
    let app = dir.0.join("shop");
    fs::create_dir_all(app.join("config")).unwrap();
    fs::create_dir_all(app.join("dist")).unwrap();
    fs::copy(hello_binary(), app.join("dist/hello")).unwrap();
    fs::write(
        app.join("config/keter.yaml"),
        hello_yaml("packed", "shop.example.com", &[]),
    )
    .unwrap();
    let app_s = app.to_str().unwrap();
    let (code, out, _) = keter_cmd(&["check", app_s]);
    assert_eq!((code, out.trim()), (0, format!("{app_s}: OK").as_str()));

    // A broken folder: every problem, each with file and key; not packed.
    let bad = dir.0.join("bad");
    fs::create_dir_all(bad.join("config")).unwrap();
    fs::write(
        bad.join("config/keter.yaml"),
        "stanzas:\n  - type: webapp\n    exec: ../dist/nothing\n    hosts: [ok.example.com, \"evil.com;}\"]\n    colour: blue\n  - type: webapp\n    hosts: [two.example.com]\n",
    )
    .unwrap();
    let bad_s = bad.to_str().unwrap();
    let (code, out, _) = keter_cmd(&["check", bad_s]);
    assert_eq!(code, 1, "{out}");
    let errors: Vec<&str> = out.lines().filter(|l| l.starts_with("error: ")).collect();
    assert!(errors.len() >= 2, "{out}");
    assert!(
        errors
            .iter()
            .any(|l| l.contains("config/keter.yaml: stanzas[0].hosts[1]:")),
        "{out}"
    );
    assert!(
        errors
            .iter()
            .any(|l| l.contains("stanzas[1].exec: required")),
        "{out}"
    );
    assert!(out.contains("warning: ") && out.contains("colour"), "{out}");
    let bad_out = dir.0.join("bad.keter");
    let (code, _, err) = keter_cmd(&["bundle", bad_s, "-o", bad_out.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("not packed"), "{err}");
    assert!(!bad_out.exists());

    // A global config with several errors.
    let config = dir.0.join("broken-config.yaml");
    fs::write(
        &config,
        "listeners: 80\nreadiness-timeout: soon\nstatus: somewhere\n",
    )
    .unwrap();
    let (code, out, _) = keter_cmd(&["check", config.to_str().unwrap()]);
    assert_eq!(code, 1);
    for key in ["root", "listeners", "readiness-timeout", "status"] {
        assert!(
            out.lines()
                .any(|l| l.starts_with("error: ") && l.contains(&format!(": {key}"))),
            "no error for {key}:\n{out}"
        );
    }

    // bundle, then check and render the file it wrote.
    let packed = dir.0.join("shop.keter");
    let (code, out, err) = keter_cmd(&["bundle", app_s, "-o", packed.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("sha256 "), "{out}");
    let (code, out, _) = keter_cmd(&["check", packed.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    let render_config = dir.0.join("render.yaml");
    fs::write(
        &render_config,
        "root: /srv/keter\nlisteners: [{host: 127.0.0.1, port: 8080}]\nport-range: 7100-7199\n",
    )
    .unwrap();
    let (code, out, err) = keter_cmd(&[
        "render",
        packed.to_str().unwrap(),
        "-c",
        render_config.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("# Rendered by `keter render`"), "{out}");
    assert!(out.contains("placeholders"), "{out}");
    assert!(out.contains("server 127.0.0.1:7100;"), "{out}");
    assert!(out.contains("listen 127.0.0.1:8080;"), "{out}");
    assert!(out.contains("server_name shop.example.com;"), "{out}");
    let (code, _, err) = keter_cmd(&["render", bad_s]);
    assert_eq!(code, 1);
    assert!(err.contains("stanzas[0].hosts[1]"), "{err}");

    // Help for each command, with examples.
    for cmd in ["check", "render", "bundle", "status", "run"] {
        let (code, out, _) = keter_cmd(&[cmd, "--help"]);
        assert_eq!(code, 0);
        assert!(out.starts_with(&format!("keter {cmd}")), "{out}");
        assert!(out.contains("Examples:"), "{out}");
        assert_eq!(keter_cmd(&["help", cmd]).1, out);
    }
    assert_eq!(keter_cmd(&["render"]).0, 2);

    // `status: false`: nothing to ask.
    let disabled = dir.0.join("disabled.yaml");
    fs::write(&disabled, "root: root\nstatus: false\n").unwrap();
    let (code, _, err) = keter_cmd(&["status", "-c", disabled.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("disabled"), "{err}");

    // The packed bundle deploys and serves; `keter status` reads the daemon's unix socket.
    let k = Keter::start("status-socket");
    k.deploy("shop", &packed);
    k.wait_for("shop.example.com", "packed", WAIT);
    wait_state(&k, "shop", "running");
    let (code, out, err) = keter_cmd(&["status", "-c", k.config_path.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.lines().nth(1).unwrap().starts_with("shop "), "{out}");
    let (code, out, _) = keter_cmd(&["status", "-c", k.config_path.to_str().unwrap(), "--json"]);
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(&out).unwrap();
    let sha = v["apps"][0]["sha256"].as_str().unwrap().to_string();
    assert!(keter_cmd(&["bundle", app_s, "-o", "/dev/null/x.keter"]).0 == 1);
    // The log names each lifecycle step with its duration.
    let log = k.log();
    assert!(
        log.contains("shop: unpacked ") && log.contains(" ms"),
        "{log}"
    );
    assert!(log.contains("shop: ready on port "), "{log}");
    assert!(log.contains(&format!("sha256 {}", &sha[..12])), "{log}");
    drop(k);
    // A stopped daemon is reported as unreachable, not as an empty list.
    let config = dir.0.join("status-socket-gone.yaml");
    fs::write(
        &config,
        format!(
            "root: root\nstatus: {}\n",
            dir.0.join("nothing.sock").display()
        ),
    )
    .unwrap();
    let (code, _, err) = keter_cmd(&["status", "-c", config.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("cannot reach"), "{err}");
}
