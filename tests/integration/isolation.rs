//! Apps kept apart from each other and from keter (README "Security"): every app runs as a
//! system user of its own, a hostile app reaches nothing of its neighbour or of keter's state
//! (it tries, with `examples/probe`), the status interface answers operators and refuses apps,
//! and Nginx's unprivileged workers read exactly the static roots they serve, or the deploy
//! fails before the switch.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::*;

const WAIT: Duration = Duration::from_secs(30);

/// The probe app built by `cargo test`.
pub fn probe_binary() -> PathBuf {
    let hello = hello_binary();
    let probe = hello.with_file_name("probe");
    assert!(
        probe.exists(),
        "{} is missing: run `cargo test`",
        probe.display()
    );
    probe
}

/// Deploys the probe as the app `name` answering on `host`.
pub fn deploy_probe(k: &Keter, name: &str, host: &str) {
    let path = k.dir.0.join(format!("{name}.keter"));
    BundleBuilder::new()
        .file("dist/probe", fs::read(probe_binary()).unwrap(), 0o755)
        .file(
            "config/keter.yaml",
            format!("exec: ../dist/probe\nhost: {host}\n").into_bytes(),
            0o644,
        )
        .write(&path);
    k.deploy(name, &path);
    k.wait_for(host, "probe", WAIT);
}

/// The probe's report about `neighbour`, fetched through Nginx like any request.
fn report(k: &Keter, host: &str, neighbour: &str, status: &str) -> String {
    let path = format!("/report?neighbour={neighbour}&status={status}");
    let r = keter::probe::get_tcp(k.addr(), host, &path, Duration::from_secs(30)).unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    r.body
}

/// The uid, gid and groups an example app answers on `/whoami`.
fn whoami(k: &Keter, host: &str) -> (u32, u32, String) {
    let who = k.get(host, "/whoami").unwrap().body;
    let field = |name: &str| -> Vec<String> {
        who.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.split_whitespace().map(str::to_string).collect())
            .unwrap_or_default()
    };
    let uid = field("Uid:")[0].parse().unwrap();
    let gid = field("Gid:")[0].parse().unwrap();
    (uid, gid, field("Groups:").join(" "))
}

fn mode(p: &Path) -> u32 {
    fs::metadata(p).unwrap().mode() & 0o7777
}

#[test]
fn a_hostile_app_reaches_nothing_of_its_neighbour_or_of_keter() {
    let pg = crate::postgres::shared();
    let k = Keter::start_with(
        "probe",
        Opts {
            readiness_timeout: 20.0,
            extra: pg.keter_config(),
            status: StatusAt::Tcp,
            ..Opts::default()
        },
    );
    // The neighbour has everything worth stealing: a database (credentials in its
    // environment and in etc/postgres.yaml), its own certificate (copied to etc/certs), a
    // secret in its folder, and output in its log.
    let yaml = "stanzas:\n  - type: webapp\n    exec: ../dist/pgapp\n    args: [--note, secret-note]\n    host: probed.example.com\n    ssl: {key: ../tls/key.pem, certificate: ../tls/cert.pem}\nplugins:\n  postgres: true\n";
    let neighbour = k.dir.0.join("probed.keter");
    let (cert, key) = crate::stanzas::self_signed(&k.dir.0.join("tls"), "probed.example.com");
    BundleBuilder::new()
        .file(
            "dist/pgapp",
            fs::read(crate::postgres::pgapp_binary()).unwrap(),
            0o755,
        )
        .file("config/keter.yaml", yaml.as_bytes().to_vec(), 0o644)
        .file("tls/key.pem", fs::read(key).unwrap(), 0o644)
        .file("tls/cert.pem", fs::read(cert).unwrap(), 0o644)
        .file("secret.txt", b"the neighbour's secret\n".to_vec(), 0o644)
        .write(&neighbour);
    k.deploy("probed", &neighbour);
    k.wait_for("probed.example.com", "secret-note", WAIT);
    assert!(k.root.join("etc/postgres.yaml").exists());
    deploy_probe(&k, "probe", "probe.example.com");

    let Some(keter::status::StatusAddress::Tcp(status)) = &k.status else {
        unreachable!("a TCP status address was asked for")
    };
    let text = report(&k, "probe.example.com", "probed", &status.to_string());
    // It found what it went for, so every "no" below is a refusal, not a miss.
    assert!(!text.contains("found probed folders: -"), "{text}");
    assert!(!text.contains("found probed pids: -"), "{text}");
    let reached: Vec<&str> = text.lines().filter(|l| l.contains(": yes")).collect();
    assert!(
        reached.is_empty(),
        "the probe reached:\n{}\n\n{text}",
        reached.join("\n")
    );
    assert!(text.contains("summary: reached 0 of 28"), "{text}");
    // Nginx's request log exists (the neighbour was asked through Nginx), and the probe was
    // refused it: no app reads another's traffic or forges lines into the request metrics.
    for check in ["read", "append"] {
        let line = format!("reached {check} nginx/worker-files/requests.log: no");
        assert!(
            text.lines()
                .any(|l| l.starts_with(&line) && l.contains("Permission denied")),
            "{line}\n{text}"
        );
    }
    for check in [
        "reached read temp/probed-N: no",
        "reached read etc/processes: no",
        "reached read etc/postgres.yaml: no",
        "reached read probed environment: no",
        "reached write incoming/: no",
        "reached signal probed: no",
        "reached read probed output through the status interface: no -- HTTP/1.1 403",
    ] {
        assert!(text.contains(check), "{check:?} missing:\n{text}");
    }
    // The operator still reads everything.
    let out = Command::new(env!("CARGO_BIN_EXE_keter"))
        .args(["status", "-c"])
        .arg(&k.config_path)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{table}");
    assert!(
        table.contains("probed") && table.contains("probe"),
        "{table}"
    );
    assert!(
        k.log().contains("the status interface refused uid"),
        "{}",
        k.log()
    );
}

#[test]
fn each_app_runs_as_a_user_of_its_own_that_stays_the_same() {
    let mut k = Keter::start("own-users");
    k.deploy_hello("appa", "a1", "appa.example.com", &[]);
    k.deploy_hello("appb", "b1", "appb.example.com", &[]);
    k.wait_for("appa.example.com", "a1", WAIT);
    k.wait_for("appb.example.com", "b1", WAIT);
    let (a_uid, a_gid, a_groups) = whoami(&k, "appa.example.com");
    let (b_uid, _, _) = whoami(&k, "appb.example.com");
    assert!(
        a_uid != 0 && b_uid != 0 && a_uid != b_uid,
        "{a_uid} {b_uid}"
    );
    assert!((65536..=99999).contains(&a_uid), "{a_uid}");
    // Its own group and no other: none of keter's.
    assert_eq!(a_groups, a_gid.to_string());

    let user = nix::unistd::User::from_uid(a_uid.into()).unwrap().unwrap();
    assert_eq!(user.name, "keter-appa");
    let tag = format!("keter app appa in {}", k.root.display());
    assert_eq!(user.gecos.to_str().unwrap(), tag);
    let home = k.root.join("home/appa");
    assert_eq!(user.dir, home);
    let env = k.get("appa.example.com", "/env").unwrap().body;
    assert!(env.contains(&format!("HOME={}\n", home.display())), "{env}");
    assert_eq!(fs::metadata(&home).unwrap().uid(), a_uid);
    assert_eq!(mode(&home), 0o700);
    // Its folder is its own and nobody else's.
    let folder = k
        .temp_folders()
        .into_iter()
        .find(|f| f.starts_with("appa-"))
        .unwrap();
    let folder = k.root.join("temp").join(folder);
    assert_eq!(fs::metadata(&folder).unwrap().uid(), a_uid);
    assert_eq!(mode(&folder), 0o700);
    assert_eq!(mode(&folder.join("dist/hello")), 0o700);
    assert_eq!(
        k.get("appa.example.com", "/write?path=mine.txt")
            .unwrap()
            .body
            .trim(),
        "ok"
    );
    for (sub, wanted) in [
        ("incoming", 0o700),
        ("temp", 0o711),
        ("log", 0o750),
        ("etc", 0o700),
        ("nginx", 0o711),
        ("nginx/apps", 0o700),
        ("home", 0o711),
    ] {
        assert_eq!(mode(&k.root.join(sub)), wanted, "{sub}");
    }
    let records = fs::read_to_string(k.root.join("etc/app-users")).unwrap();
    assert!(
        records.contains(&format!("appa keter-appa {a_uid} {a_gid}\n")),
        "{records}"
    );

    // A redeploy and a restart of keter keep the user.
    k.deploy_hello("appa", "a2", "appa.example.com", &[]);
    k.wait_for("appa.example.com", "a2", WAIT);
    assert_eq!(whoami(&k, "appa.example.com").0, a_uid);
    k.signal_and_wait(nix::sys::signal::Signal::SIGTERM);
    k.launch();
    k.wait_for("appa.example.com", "a2", WAIT);
    assert_eq!(whoami(&k, "appa.example.com").0, a_uid);
    assert_eq!(k.log_count("created the system user keter-appa"), 1);
}

#[test]
fn apps_run_as_root_only_when_the_configuration_says_so() {
    let k = Keter::start_with(
        "as-root",
        Opts {
            extra: "run-apps-as-root: true\n".into(),
            ..Opts::default()
        },
    );
    k.deploy_hello("hello", "v1", "hello.example.com", &[]);
    k.wait_for("hello.example.com", "v1", WAIT);
    assert_eq!(whoami(&k, "hello.example.com").0, 0);
    assert!(
        k.log()
            .contains("apps run as root (run-apps-as-root: true)")
    );
    assert!(!k.root.join("etc/app-users").exists());
}

#[test]
fn a_setuid_user_that_may_deploy_is_refused() {
    // The user would be an app and a deployer at once: nobody, whose group may write
    // incoming/.
    let dir = TempDir::new("setuid-deployer");
    let root = dir.0.join("root");
    fs::create_dir_all(root.join("incoming")).unwrap();
    let nogroup = nix::unistd::User::from_name("nobody").unwrap().unwrap().gid;
    nix::unistd::chown(&root.join("incoming"), None, Some(nogroup)).unwrap();
    fs::set_permissions(root.join("incoming"), fs::Permissions::from_mode(0o2770)).unwrap();
    let config = dir.0.join("keter-config.yaml");
    fs::write(
        &config,
        format!(
            "root: {}\nsetuid: nobody\nstatus: false\nlisteners: [{{host: 127.0.0.1, port: {}}}]\n",
            root.display(),
            free_port()
        ),
    )
    .unwrap();
    let log = dir.0.join("keter.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_keter"))
        .arg(&config)
        .stdin(Stdio::null())
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("keter started:\n{}", fs::read_to_string(&log).unwrap());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let err = fs::read_to_string(&log).unwrap();
    assert!(!status.success(), "{err}");
    assert!(
        err.contains("setuid: apps would run as nobody, who may write")
            && err.contains(&root.join("incoming").display().to_string()),
        "{err}"
    );
}

#[test]
fn the_status_socket_answers_operators_and_refuses_apps() {
    let k = Keter::start("status-peer");
    let Some(keter::status::StatusAddress::Unix(socket)) = &k.status else {
        unreachable!("the default test status is a socket")
    };
    assert_eq!(mode(socket), 0o660);
    k.deploy_hello("appb", "b1", "appb.example.com", &[]);
    k.wait_for("appb.example.com", "b1", WAIT);
    deploy_probe(&k, "probe", "probe.example.com");
    let status = format!("unix:{}", socket.display());
    // Its mode keeps the app out...
    let text = report(&k, "probe.example.com", "appb", &status);
    assert!(
        text.contains("reached status interface: no -- ") && text.contains("Permission denied"),
        "{text}"
    );
    // ... and so does keter when the mode would not.
    fs::set_permissions(socket, fs::Permissions::from_mode(0o666)).unwrap();
    let text = report(&k, "probe.example.com", "appb", &status);
    assert!(
        text.contains("reached read appb output through the status interface: no -- HTTP/1.1 403")
            && text.contains("the user of the app probe"),
        "{text}"
    );
    let api = keter::status::client::get(
        k.status.as_ref().unwrap(),
        "/api/apps/appb/log",
        Duration::from_secs(5),
    )
    .unwrap();
    assert!(api.contains("\"app\":\"appb\""), "{api}");
}

#[test]
fn a_static_root_the_workers_cannot_read_fails_before_the_switch() {
    let k = Keter::start("static-unreadable");
    k.deploy_hello("site", "v1", "site.example.com", &[]);
    k.wait_for("site.example.com", "v1", WAIT);
    // The test's folder, above keter's root, now shuts out exactly the group of Nginx's
    // workers (www-data); everyone else, the apps' users included, may still pass.
    let www = nix::unistd::Group::from_name("www-data").unwrap().unwrap();
    nix::unistd::chown(&k.dir.0, None, Some(www.gid)).unwrap();
    fs::set_permissions(&k.dir.0, fs::Permissions::from_mode(0o705)).unwrap();
    let bundle = k.dir.0.join("site-v2.keter");
    BundleBuilder::hello(
        "stanzas:\n  - type: webapp\n    exec: ../dist/hello\n    args: [--version-string, v2]\n    host: site.example.com\n  - type: static-files\n    root: ../static\n    hosts: [static.example.com]\n",
    )
    .file("static/hello.txt", b"static hello\n".to_vec(), 0o644)
    .write(&bundle);
    k.deploy("site", &bundle);
    k.wait_deploy_result("site", DeployResult::Failed, WAIT);
    let log = k.log();
    let line = log
        .lines()
        .find(|l| l.contains("site: deploy of site.keter failed"))
        .unwrap();
    for part in [
        "is not readable by Nginx's workers (user www-data, uid 33, gid 33)",
        "/static",
        &format!(
            "{} (mode 0705, owner root, group www-data) does not let them search it (x)",
            k.dir.0.display()
        ),
        "the previous version keeps serving",
    ] {
        assert!(line.contains(part), "{part:?} missing in {line}");
    }
    assert!(!log.contains("switched to deploy 2"), "{log}");
    assert_eq!(k.get("site.example.com", "/").unwrap().body.trim(), "v1");
    fs::set_permissions(&k.dir.0, fs::Permissions::from_mode(0o755)).unwrap();
}
