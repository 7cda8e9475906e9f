//! `ssl: acme` in bundles, end to end: the keter binary, its Nginx (a plain listener where
//! pebble validates and a TLS listener without a certificate of its own), a real ACME CA on
//! loopback (`pebble.rs`) and curl trusting pebble's root only. A deploy serves plain HTTP at
//! once; the certificate follows without anyone touching keter, is reused across redeploys,
//! restarts and in-place upgrades, and a CA that is down never fails a deploy. Refusals are the
//! same in `keter check` and in a deploy.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::Value;

use crate::pebble::{Pebble, PebbleOpts, https_get};
use crate::stanzas::{header, request};
use crate::status::{json, keter_cmd};
use crate::support::{BundleBuilder, DeployResult, Keter, Opts, TempDir, free_port};

const WAIT: Duration = Duration::from_secs(60);

/// What keter logs at each attempt at the CA (obtaining or renewing).
const ATTEMPT: &str = "a certificate from https://";

/// A keter with a plain listener on `port` (pebble validates there) and a TLS listener on
/// `tls_port` with no certificate of its own; with an `acme` section for `pebble` when `acme`.
fn keter(label: &str, pebble: &Pebble, port: u16, tls_port: u16, acme: bool) -> Keter {
    Keter::start_with(
        label,
        Opts {
            port: Some(port),
            listeners: Some(format!(
                "[{{host: 127.0.0.1, port: {port}}}, {{host: 127.0.0.1, port: {tls_port}, tls: true}}]"
            )),
            extra: format!(
                "external-https-port: {tls_port}\n{}",
                if acme {
                    pebble.keter_config(&pebble.directory)
                } else {
                    String::new()
                }
            ),
            ..Opts::default()
        },
    )
}

/// The example app answering `version` on `hosts`, with `ssl: acme` and `more` keys.
fn bundle(k: &Keter, name: &str, version: &str, hosts: &[&str], more: &str) -> PathBuf {
    let hosts: Vec<String> = hosts.iter().map(|h| format!("{h:?}")).collect();
    let yaml = format!(
        "stanzas:\n  - type: webapp\n    exec: ../dist/hello\n    args: [--version-string, {version}]\n    hosts: [{}]\n    ssl: acme\n{more}",
        hosts.join(", ")
    );
    let path = k.dir.0.join(format!("{name}-{version}.keter"));
    BundleBuilder::hello(&yaml).write(&path);
    path
}

/// Waits until `host` answers `body` over HTTPS with a certificate that pebble's root
/// verifies.
fn wait_https(k: &Keter, pebble: &Pebble, tls_port: u16, host: &str, body: &str, root: &Path) {
    let start = Instant::now();
    loop {
        let got = https_get(tls_port, host, "/", root).map(|b| b.trim().to_string());
        if got.as_deref() == Ok(body) {
            return;
        }
        assert!(
            start.elapsed() < WAIT,
            "{host} never answered {body:?} over HTTPS: {got:?}\n{}\npebble:\n{}",
            k.log(),
            pebble.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The app's certificates as `/api/apps/NAME` reports them.
fn certificates(k: &Keter, app: &str) -> Vec<Value> {
    json(k, &format!("/api/apps/{app}"))["certificates"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Waits until the app's single certificate satisfies `good`.
fn wait_certificate(k: &Keter, app: &str, what: &str, good: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        let certs = certificates(k, app);
        if let [c] = certs.as_slice()
            && good(c)
        {
            return c.clone();
        }
        assert!(
            start.elapsed() < WAIT,
            "{app}: the certificate never {what}: {certs:#?}\n{}",
            k.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The serial number of the certificate Nginx presents for `host`, in lowercase hex.
fn served_serial(tls_port: u16, host: &str) -> String {
    let script = format!(
        "openssl s_client -connect 127.0.0.1:{tls_port} -servername {host} </dev/null 2>/dev/null | openssl x509 -noout -serial"
    );
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(script)
        .output()
        .expect("openssl is needed for the ACME tests (apt-get install openssl)");
    let text = String::from_utf8_lossy(&out.stdout);
    hex(&Value::from(text.trim().trim_start_matches("serial=")))
}

/// A serial number in lowercase hex without leading zeros.
fn hex(v: &Value) -> String {
    v.as_str()
        .unwrap_or_default()
        .to_ascii_lowercase()
        .trim_start_matches('0')
        .to_string()
}

#[test]
fn ssl_acme_serves_http_at_once_then_https_reuses_the_certificate_and_lets_go_of_old_hosts() {
    let dir = TempDir::new("acme-stanza");
    let (port, tls_port) = (free_port(), free_port());
    let pebble = Pebble::start(
        &dir.0.join("pebble"),
        PebbleOpts {
            http_port: port,
            validity: Duration::from_secs(3600),
            port: None,
        },
    );
    let mut k = keter("acme-stanza", &pebble, port, tls_port, true);
    let hosts = ["shop.test", "www.shop.test"];
    k.deploy("shop", &bundle(&k, "shop", "v1", &hosts, ""));
    // Plain HTTP at once, whatever the CA does.
    k.wait_for("shop.test", "v1", WAIT);
    let root = pebble.write_root();
    for host in hosts {
        wait_https(&k, &pebble, tls_port, host, "v1", &root);
    }
    // A name without a certificate gets no handshake on the listener without one.
    let refused = https_get(tls_port, "other.test", "/", &root);
    assert!(refused.is_err(), "{refused:?}");
    let cert = wait_certificate(&k, "shop", "became valid", |c| c["state"] == "valid");
    let mut names: Vec<&str> = cert["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    names.sort();
    assert_eq!(names, hosts);
    assert_eq!(
        (&cert["failures"], &cert["last_error"]),
        (&0.into(), &Value::Null)
    );
    assert!(
        cert["valid_until"].is_string() && cert["renew_at"].is_string(),
        "{cert:#?}"
    );
    let serial = cert["serial"].as_str().unwrap().to_string();
    let file = k
        .root
        .join("etc/acme/certs")
        .join(format!("{}.pem", cert["name"].as_str().unwrap()));
    assert!(file.is_file(), "{}", file.display());
    assert_eq!(k.log_count(ATTEMPT), 1, "{}", k.log());
    let (code, out, _) = keter_cmd(&["status", "-c", k.config_path.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("shop: certificate for shop.test,www.shop.test: valid, valid until"),
        "{out}"
    );

    // A redeploy asks for the same hosts: the same certificate, at once, no new order.
    k.deploy("shop", &bundle(&k, "shop", "v2", &hosts, ""));
    k.wait_for("shop.test", "v2", WAIT);
    assert_eq!(
        https_get(tls_port, "www.shop.test", "/", &root).map(|b| b.trim().to_string()),
        Ok("v2".to_string())
    );
    let cert = wait_certificate(&k, "shop", "was reported", |_| true);
    assert_eq!(cert["serial"].as_str(), Some(serial.as_str()));

    // keter stopped and started again: HTTPS as soon as the app is back, with the stored
    // certificate.
    k.signal_and_wait(Signal::SIGTERM);
    k.launch();
    k.wait_for("shop.test", "v2", WAIT);
    assert_eq!(
        https_get(tls_port, "shop.test", "/", &root).map(|b| b.trim().to_string()),
        Ok("v2".to_string())
    );
    // An in-place upgrade: the new image asks its own ACME thread, which has the file.
    k.signal(Signal::SIGUSR2);
    k.wait_log("keter: upgraded in place", WAIT);
    k.wait_log("shop: site rendered again with its certificates", WAIT);
    assert_eq!(
        https_get(tls_port, "shop.test", "/", &root).map(|b| b.trim().to_string()),
        Ok("v2".to_string())
    );
    let cert = wait_certificate(&k, "shop", "was reported", |_| true);
    assert_eq!(cert["serial"].as_str(), Some(serial.as_str()));
    assert_eq!(
        k.log_count(ATTEMPT),
        1,
        "a new order was made:\n{}",
        k.log()
    );

    // The stanza asks for other hosts: a certificate for those, and the old set is no longer
    // renewed.
    k.deploy("shop", &bundle(&k, "shop", "v3", &["shop.test"], ""));
    k.wait_for("shop.test", "v3", WAIT);
    wait_https(&k, &pebble, tls_port, "shop.test", "v3", &root);
    k.wait_log("shop: no longer serves shop.test www.shop.test;", WAIT);
    let cert = wait_certificate(&k, "shop", "became valid", |c| c["state"] == "valid");
    assert_eq!(cert["hosts"], serde_json::json!(["shop.test"]));
    assert_ne!(cert["serial"].as_str(), Some(serial.as_str()));
    assert_eq!(k.log_count(ATTEMPT), 2, "{}", k.log());
    let metrics = crate::status::page(&k, "/metrics");
    let name = cert["name"].as_str().unwrap();
    assert!(
        metrics.contains(&format!(
            "keter_certificate_failures{{certificate=\"{name}\"}} 0"
        )),
        "{metrics}"
    );
    // The app is deleted: its certificate is no longer renewed (the file stays for later).
    fs::remove_file(k.incoming().join("shop.keter")).unwrap();
    k.wait_log("shop: no longer serves shop.test;", WAIT);
    let start = Instant::now();
    while crate::status::page(&k, "/metrics").contains("certificate=\"shop.test-") {
        assert!(
            start.elapsed() < WAIT,
            "still renewed after the app was deleted"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(file.is_file());
}

#[test]
fn ssl_acme_with_the_ca_down_serves_plain_http_without_redirect_until_the_certificate_arrives_and_renews()
 {
    let dir = TempDir::new("acme-stanza-down");
    let (port, tls_port) = (free_port(), free_port());
    let mut pebble = Pebble::prepare(
        &dir.0.join("pebble"),
        PebbleOpts {
            http_port: port,
            validity: Duration::from_secs(15),
            port: None,
        },
    );
    let k = keter("acme-stanza-down", &pebble, port, tls_port, true);
    let more = "    requires-secure: true\n";
    k.deploy("down", &bundle(&k, "down", "v1", &["down.test"], more));
    // The deploy succeeds and serves plain HTTP, with no redirect to an HTTPS that does not
    // work yet.
    k.wait_for("down.test", "v1", WAIT);
    assert_eq!(
        json(&k, "/api/apps/down")["last_deploy"]["result"],
        "succeeded"
    );
    let cert = wait_certificate(&k, "down", "failed", |c| c["failures"].as_u64() >= Some(1));
    assert_eq!(cert["state"], "obtaining", "{cert:#?}");
    assert_eq!(cert["last_error"]["kind"], "ca-unreachable", "{cert:#?}");
    assert!(cert["next_attempt"].is_string(), "{cert:#?}");
    let (status, _, body) = request(k.addr(), "down.test", "/x");
    assert_eq!((status, body.trim()), (200, "v1"));
    let (code, out, _) = keter_cmd(&["status", "-c", k.config_path.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(
            "down: certificate for down.test: obtaining; last attempt failed (ca-unreachable)"
        ) && out.contains("next attempt at"),
        "{out}"
    );
    let page = crate::status::page(&k, "/apps/down");
    assert!(page.contains("ca-unreachable"), "{page}");

    // The CA comes up: the certificate arrives by itself, HTTPS serves and plain HTTP now
    // redirects (the ACME challenge path still answers on plain HTTP).
    pebble.run();
    let root = pebble.write_root();
    wait_https(&k, &pebble, tls_port, "down.test", "v1", &root);
    let cert = wait_certificate(&k, "down", "became valid", |c| c["state"] == "valid");
    assert_eq!(cert["last_error"], Value::Null);
    let start = Instant::now();
    loop {
        let (status, headers, _) = request(k.addr(), "down.test", "/x?y=1");
        if status == 301 {
            assert_eq!(
                header(&headers, "location"),
                Some(format!("https://down.test:{tls_port}/x?y=1").as_str())
            );
            break;
        }
        assert!(start.elapsed() < WAIT, "no redirect: {status}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(served_serial(tls_port, "down.test"), hex(&cert["serial"]));

    // 15 s certificates: renewal at two thirds of the lifetime, into the same file; Nginx is
    // reloaded and serves the new one, and the app is neither deployed nor restarted again.
    let pid_of = || json(&k, "/api/apps/down")["processes"][0]["pid"].clone();
    let pid = pid_of();
    assert!(pid.is_number(), "{pid}");
    let renewed = wait_certificate(&k, "down", "was renewed", |c| c["serial"] != cert["serial"]);
    let start = Instant::now();
    while served_serial(tls_port, "down.test") != hex(&renewed["serial"]) {
        assert!(
            start.elapsed() < WAIT,
            "the renewed certificate is not served"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    wait_https(&k, &pebble, tls_port, "down.test", "v1", &root);
    assert_eq!(pid_of(), pid);
    assert_eq!(
        json(&k, "/api/apps/down")["deploy"],
        1,
        "the app was not deployed again"
    );
}

#[test]
fn ssl_acme_refusals_are_the_same_in_keter_check_and_a_deploy() {
    let dir = TempDir::new("acme-stanza-refused");
    let (port, tls_port) = (free_port(), free_port());
    let pebble = Pebble::prepare(
        &dir.0.join("pebble"),
        PebbleOpts {
            http_port: port,
            validity: Duration::from_secs(3600),
            port: None,
        },
    );
    let with = keter("acme-refused", &pebble, port, tls_port, true);
    let without = keter(
        "acme-refused-none",
        &pebble,
        free_port(),
        free_port(),
        false,
    );
    let cases: [(&Keter, &str, &[&str], &str); 2] = [
        (
            &with,
            "wild",
            &["www.wild.test", "*.wild.test"],
            "stanzas[0].ssl: *.wild.test: a wildcard host cannot get a certificate over ACME",
        ),
        (
            &without,
            "nosection",
            &["nosection.test"],
            "stanzas[0].ssl: ssl: acme needs the `acme` section of keter's global configuration",
        ),
    ];
    for (k, name, hosts, message) in cases {
        let path = bundle(k, name, "v1", hosts, "");
        let (code, out, err) = keter_cmd(&[
            "check",
            path.to_str().unwrap(),
            "-c",
            k.config_path.to_str().unwrap(),
        ]);
        assert_eq!(code, 1, "{out}{err}");
        let line = out
            .lines()
            .chain(err.lines())
            .find(|l| l.contains(message))
            .unwrap_or_else(|| panic!("keter check did not say {message:?}:\n{out}{err}"))
            .to_string();
        assert!(line.contains(&format!("{name}-v1.keter")), "{line}");
        k.deploy(name, &path);
        k.wait_deploy_result(name, DeployResult::Failed, WAIT);
        let r = json(k, &format!("/api/apps/{name}"));
        assert_eq!(r["last_deploy"]["result"], "failed", "{r:#?}");
        let error = r["last_deploy"]["error"].as_str().unwrap().to_string();
        assert!(error.contains(message), "{error}");
        assert!(error.contains(&format!("{name}.keter")), "{error}");
        assert_eq!(
            json(k, &format!("/api/apps/{name}"))["last_deploy"]["error_kind"],
            "config"
        );
    }
}
