//! Certificates over ACME against a real CA on loopback (pebble, see `pebble.rs`) and keter's
//! real Nginx, which answers the HTTP-01 challenges from keter's webroot: keter's own client
//! (`keter::acme`, driven here as an app worker will drive it) obtains, renews and reuses a
//! certificate that Nginx then serves; certbot's webroot mode works for a deployed host; and
//! a CA that is down, a challenge answered wrongly and a rate limit are each classified and
//! retried while the app keeps serving plain HTTP.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use keter::acme::{Acme, CertState, CertStatus, Certificate, ErrorKind, HostSet};
use keter::names::Hostname;

use crate::pebble::{Pebble, PebbleOpts, RateLimitingProxy, https_get, require, verify_chain};
use crate::support::{BundleBuilder, Keter, Opts, TempDir, free_port, hello_binary};

const WAIT: Duration = Duration::from_secs(60);

fn init_log() {
    let _ = env_logger::builder().is_test(true).try_init();
}

fn set(names: &[&str]) -> HostSet {
    let hosts: Vec<Hostname> = names.iter().map(|n| Hostname::new(n).unwrap()).collect();
    HostSet::new(&hosts).unwrap()
}

/// A keter whose Nginx listens for plain HTTP on `port` (where pebble validates) and for
/// TLS on `tls_port` (with a self-signed default certificate), with an `acme` section for
/// `directory`.
fn keter(label: &str, pebble: &Pebble, port: u16, tls_port: u16, directory: &str) -> Keter {
    let dir = pebble.dir.join("keter-tls");
    fs::create_dir_all(&dir).unwrap();
    let default = rcgen::generate_simple_self_signed(vec!["default.test".to_string()]).unwrap();
    fs::write(dir.join("default.pem"), default.cert.pem()).unwrap();
    fs::write(dir.join("default.key"), default.signing_key.serialize_pem()).unwrap();
    Keter::start_with(
        label,
        Opts {
            port: Some(port),
            extra: format!(
                "ssl: {{host: 127.0.0.1, port: {tls_port}, key: {}, certificate: {}}}\nexternal-https-port: {tls_port}\n{}",
                dir.join("default.key").display(),
                dir.join("default.pem").display(),
                pebble.keter_config(directory)
            ),
            ..Opts::default()
        },
    )
}

/// The ACME thread for the running keter's configuration and root.
fn acme_of(k: &Keter) -> Acme {
    let config = keter::config::Config::load(&k.config_path).unwrap();
    let acme = config.acme.expect("the test config has an acme section");
    Acme::start(acme, &config.root.join("etc"), &config.acme_webroot).unwrap()
}

/// Where a stanza's own certificate comes from.
enum Own<'a> {
    None,
    /// These key and certificate files, copied into the bundle.
    InBundle(&'a Path, &'a Path),
    /// These files on the host, named by their absolute paths.
    OnHost(&'a Path, &'a Path),
}

/// The example app answering `version` on `hosts`, with the stanza's own certificate if any.
fn deploy(k: &Keter, name: &str, version: &str, hosts: &[&str], own: Own) {
    let hosts_yaml: Vec<String> = hosts.iter().map(|h| format!("{h:?}")).collect();
    let mut yaml = format!(
        "stanzas:\n  - type: webapp\n    exec: ../dist/hello\n    args: [--version-string, {version}]\n    hosts: [{}]\n",
        hosts_yaml.join(", ")
    );
    let mut b = BundleBuilder::new();
    match own {
        Own::None => {}
        Own::InBundle(key, cert) => {
            yaml.push_str("    ssl: {key: ../tls/key.pem, certificate: ../tls/cert.pem}\n");
            b = b.file("tls/key.pem", fs::read(key).unwrap(), 0o600).file(
                "tls/cert.pem",
                fs::read(cert).unwrap(),
                0o644,
            );
        }
        Own::OnHost(key, cert) => yaml.push_str(&format!(
            "    ssl: {{key: {}, certificate: {}}}\n",
            key.display(),
            cert.display()
        )),
    }
    let b = b
        .file("dist/hello", fs::read(hello_binary()).unwrap(), 0o755)
        .file("config/keter.yaml", yaml.into_bytes(), 0o644);
    let path = k.dir.0.join(format!("{name}-{version}.keter"));
    b.write(&path);
    k.deploy(name, &path);
    k.wait_for(hosts[0], version, WAIT);
}

/// Waits until the status of `hosts` satisfies `good`.
fn wait_status(
    acme: &Acme,
    hosts: &HostSet,
    what: &str,
    good: impl Fn(&CertStatus) -> bool,
    pebble: &Pebble,
) -> CertStatus {
    let start = Instant::now();
    loop {
        let status = acme.status(hosts);
        if let Some(s) = &status
            && good(s)
        {
            return s.clone();
        }
        assert!(
            start.elapsed() < WAIT,
            "{hosts}: never {what}; last status {status:#?}\npebble:\n{}",
            pebble.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn mode(p: &Path) -> u32 {
    fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// The challenge answers left in keter's webroot.
fn challenge_files(k: &Keter) -> Vec<String> {
    match fs::read_dir(k.root.join("acme/.well-known/acme-challenge")) {
        Ok(entries) => entries
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    }
}

#[test]
fn keters_client_obtains_renews_and_reuses_a_certificate_that_nginx_serves() {
    init_log();
    let dir = TempDir::new("acme-obtain");
    let (port, tls_port) = (free_port(), free_port());
    // 30 s certificates: renewal is due 20 s after each is issued, and the restart below
    // comes well before the second one's.
    let mut pebble = Pebble::start(
        &dir.0.join("pebble"),
        PebbleOpts {
            http_port: port,
            validity: Duration::from_secs(30),
            port: None,
        },
    );
    let mut k = keter("acme-obtain", &pebble, port, tls_port, &pebble.directory);
    deploy(&k, "shop", "v1", &["shop.test", "www.shop.test"], Own::None);

    let hosts = set(&["shop.test", "www.shop.test"]);
    let acme = acme_of(&k);
    let (tx, rx) = mpsc::channel::<Certificate>();
    let stored = acme.want(&hosts, move |c| {
        let _ = tx.send(c.clone());
    });
    assert_eq!(stored, None);
    let first = rx
        .recv_timeout(WAIT)
        .unwrap_or_else(|_| panic!("no certificate:\n{:#?}\n{}", acme.statuses(), pebble.log()));
    assert!(
        first.path.starts_with(k.root.join("etc/acme/certs")),
        "{first:?}"
    );
    assert_eq!(mode(&first.path), 0o600);
    assert_eq!(mode(&k.root.join("etc/acme")), 0o700);
    let mut names = first.names.clone();
    names.sort();
    assert_eq!(names, ["shop.test", "www.shop.test"]);
    let accounts: Vec<PathBuf> = fs::read_dir(k.root.join("etc/acme"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    assert_eq!(accounts.len(), 1, "{accounts:?}");
    assert_eq!(mode(&accounts[0]), 0o600);
    assert_eq!(
        challenge_files(&k),
        Vec::<String>::new(),
        "answers left behind"
    );
    let status = wait_status(
        &acme,
        &hosts,
        "valid",
        |s| s.state == CertState::Valid,
        &pebble,
    );
    assert_eq!(status.valid_until, Some(first.not_after));
    assert_eq!(status.renew_at, Some(first.renew_at()));
    assert_eq!((status.failures, &status.last_error), (0, &None));
    let root = pebble.write_root();
    verify_chain(&first.path, &fs::read_to_string(&root).unwrap(), &dir.0)
        .unwrap_or_else(|e| panic!("the chain does not verify against pebble's root: {e}"));

    // Nginx serves it: the file as a stanza's own certificate (key and certificate in one
    // file), verified by curl against pebble's root alone.
    deploy(
        &k,
        "shop",
        "v2",
        &["shop.test", "www.shop.test"],
        Own::InBundle(&first.path, &first.path),
    );
    for host in ["shop.test", "www.shop.test"] {
        assert_eq!(
            https_get(tls_port, host, "/", &root).map(|b| b.trim().to_string()),
            Ok("v2".to_string()),
            "{host}"
        );
    }
    // The self-signed default certificate is not trusted: the check above means something.
    assert!(https_get(tls_port, "other.test", "/", &root).is_err());

    // Renewal at two thirds of the lifetime: a new certificate in the same file.
    let second = rx
        .recv_timeout(WAIT)
        .unwrap_or_else(|_| panic!("never renewed:\n{:#?}\n{}", acme.statuses(), pebble.log()));
    assert_ne!(second.serial, first.serial);
    assert!(second.not_after > first.not_after);
    assert!(SystemTime::now() >= first.renew_at());
    // At two thirds of the lifetime, well before the first one expired.
    let lifetime = first.not_after.duration_since(first.not_before).unwrap();
    assert_eq!(first.renew_at(), first.not_before + lifetime * 2 / 3);
    assert!(
        second.not_before + Duration::from_secs(5) < first.not_after,
        "{first:?} {second:?}"
    );
    assert_eq!(second.path, first.path);
    assert_eq!(mode(&second.path), 0o600);
    verify_chain(&second.path, &fs::read_to_string(&root).unwrap(), &dir.0).unwrap();

    // Restart: keter and its ACME thread come back with the CA gone; the stored certificate
    // is reused at once, and nothing is asked of the CA before its renewal is due.
    acme.stop();
    pebble.stop();
    k.signal_and_wait(nix::sys::signal::Signal::SIGTERM);
    k.launch();
    let acme = acme_of(&k);
    let (tx, rx) = mpsc::channel::<Certificate>();
    let reused = acme
        .want(&hosts, move |c| {
            let _ = tx.send(c.clone());
        })
        .expect("the stored certificate is reused after a restart");
    assert_eq!(reused.serial, second.serial);
    let status = wait_status(&acme, &hosts, "taken in", |_| true, &pebble);
    assert_eq!(status.state, CertState::Valid, "{status:#?}");
    assert_eq!(status.next_attempt, second.renew_at());
    assert_eq!((status.failures, &status.last_error), (0, &None));
    assert!(rx.try_recv().is_err());
    deploy(
        &k,
        "shop",
        "v3",
        &["shop.test", "www.shop.test"],
        Own::InBundle(&reused.path, &reused.path),
    );
    assert_eq!(
        https_get(tls_port, "www.shop.test", "/", &root).map(|b| b.trim().to_string()),
        Ok("v3".to_string())
    );
}

#[test]
fn certbot_webroot_mode_works_for_a_deployed_host_and_a_bundle_serves_the_result() {
    init_log();
    require("certbot", "certbot");
    let dir = TempDir::new("acme-certbot");
    let (port, tls_port) = (free_port(), free_port());
    let pebble = Pebble::start(
        &dir.0.join("pebble"),
        PebbleOpts {
            http_port: port,
            validity: Duration::from_secs(3600),
            port: None,
        },
    );
    let k = keter("acme-certbot", &pebble, port, tls_port, &pebble.directory);
    deploy(&k, "blog", "v1", &["blog.test", "www.blog.test"], Own::None);
    let le = dir.0.join("letsencrypt");
    let out = Command::new("certbot")
        .args(["certonly", "--webroot", "-w"])
        .arg(k.root.join("acme"))
        .args(["-d", "blog.test", "-d", "www.blog.test", "--server"])
        .arg(&pebble.directory)
        .args([
            "--agree-tos",
            "--register-unsafely-without-email",
            "--non-interactive",
            "--config-dir",
        ])
        .arg(le.join("config"))
        .arg("--work-dir")
        .arg(le.join("work"))
        .arg("--logs-dir")
        .arg(le.join("logs"))
        .env("REQUESTS_CA_BUNDLE", &pebble.listener.ca)
        .output()
        .expect("certbot runs");
    assert!(
        out.status.success(),
        "certbot failed:\n{}\n{}\npebble:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        pebble.log()
    );
    let live = le.join("config/live/blog.test");
    let root = pebble.write_root();
    deploy(
        &k,
        "blog",
        "v2",
        &["blog.test", "www.blog.test"],
        Own::OnHost(&live.join("privkey.pem"), &live.join("fullchain.pem")),
    );
    for host in ["blog.test", "www.blog.test"] {
        assert_eq!(
            https_get(tls_port, host, "/", &root).map(|b| b.trim().to_string()),
            Ok("v2".to_string()),
            "{host}"
        );
    }
}

#[test]
fn a_ca_that_is_down_or_forgot_the_account_is_reported_and_retried() {
    init_log();
    let dir = TempDir::new("acme-down");
    let (port, tls_port) = (free_port(), free_port());
    let mut pebble = Pebble::prepare(
        &dir.0.join("pebble"),
        PebbleOpts {
            http_port: port,
            validity: Duration::from_secs(3600),
            port: None,
        },
    );
    let k = keter("acme-down", &pebble, port, tls_port, &pebble.directory);
    deploy(&k, "down", "v1", &["down.test"], Own::None);
    let hosts = set(&["down.test"]);
    let acme = acme_of(&k);
    acme.want(&hosts, |_| {});
    let failed = wait_status(&acme, &hosts, "failed", |s| s.failures >= 1, &pebble);
    let error = failed.last_error.clone().unwrap();
    assert_eq!(error.kind, ErrorKind::CaUnreachable, "{error:#?}");
    assert!(
        error
            .message
            .contains(&format!("127.0.0.1:{}", pebble.port)),
        "{error:#?}"
    );
    assert_eq!(failed.state, CertState::Obtaining);
    assert!(
        failed.next_attempt >= error.at + Duration::from_secs(1),
        "{failed:#?}"
    );
    // Retried, with a growing wait.
    let again = wait_status(&acme, &hosts, "retried", |s| s.failures >= 2, &pebble);
    let second = again.last_error.clone().unwrap();
    assert!(
        again.next_attempt >= second.at + Duration::from_secs(2),
        "{again:#?}"
    );
    // The app serves plain HTTP all along.
    assert_eq!(k.get("down.test", "/").unwrap().body.trim(), "v1");
    // The CA comes up: the next retry gets the certificate.
    pebble.run();
    let valid = wait_status(
        &acme,
        &hosts,
        "valid",
        |s| s.state == CertState::Valid,
        &pebble,
    );
    assert_eq!((valid.failures, valid.last_error), (0, None));

    // The CA loses its state and keter's account with it (pebble keeps nothing across a
    // restart): the attempt that finds out sets the account aside, the next one opens a new
    // account and gets the certificate.
    pebble.stop();
    pebble.run();
    acme.renew_now(&hosts);
    let forgot = wait_status(
        &acme,
        &hosts,
        "told of the lost account",
        |s| s.failures >= 1,
        &pebble,
    );
    let error = forgot.last_error.clone().unwrap();
    assert_eq!(error.kind, ErrorKind::Other, "{error:#?}");
    assert!(error.message.contains("accountDoesNotExist"), "{error:#?}");
    assert!(error.message.contains("opens a new account"), "{error:#?}");
    assert_eq!(
        forgot.state,
        CertState::Valid,
        "the old certificate still serves"
    );
    let renewed = wait_status(
        &acme,
        &hosts,
        "renewed with a new account",
        |s| s.failures == 0 && s.serial != valid.serial,
        &pebble,
    );
    assert_eq!(renewed.state, CertState::Valid);
    let set_aside = fs::read_dir(k.root.join("etc/acme"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".json.unknown-"))
        .count();
    assert_eq!(set_aside, 1);
}

#[test]
fn a_challenge_answered_wrongly_is_reported_and_retried() {
    init_log();
    let dir = TempDir::new("acme-wrong");
    let (port, tls_port) = (free_port(), free_port());
    // The CA reaches another web server for the host (the app itself, not keter's Nginx),
    // which answers every path with its version.
    let elsewhere = free_port();
    let mut other = Command::new(hello_binary())
        .args(["--version-string", "not-the-token"])
        .env("PORT", elsewhere.to_string())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pebble = Pebble::start(
        &dir.0.join("pebble"),
        PebbleOpts {
            http_port: elsewhere,
            validity: Duration::from_secs(3600),
            port: None,
        },
    );
    let k = keter("acme-wrong", &pebble, port, tls_port, &pebble.directory);
    deploy(&k, "wrong", "v1", &["wrong.test"], Own::None);
    let hosts = set(&["wrong.test"]);
    let acme = acme_of(&k);
    acme.want(&hosts, |_| {});
    let failed = wait_status(&acme, &hosts, "retried", |s| s.failures >= 2, &pebble);
    let _ = other.kill();
    let _ = other.wait();
    let error = failed.last_error.clone().unwrap();
    assert_eq!(error.kind, ErrorKind::ChallengeFailed, "{error:#?}");
    assert!(error.message.starts_with("wrong.test: "), "{error:#?}");
    assert_eq!(failed.state, CertState::Obtaining);
    assert!(
        failed.next_attempt >= error.at + Duration::from_secs(2),
        "{failed:#?}"
    );
    assert_eq!(
        challenge_files(&k),
        Vec::<String>::new(),
        "answers left behind"
    );
    assert_eq!(k.get("wrong.test", "/").unwrap().body.trim(), "v1");
}

#[test]
fn a_rate_limit_is_reported_and_retried_no_sooner_than_the_ca_asks() {
    init_log();
    let dir = TempDir::new("acme-limited");
    let (port, tls_port) = (free_port(), free_port());
    let pebble = Pebble::start(
        &dir.0.join("pebble"),
        PebbleOpts {
            http_port: port,
            validity: Duration::from_secs(3600),
            port: None,
        },
    );
    let proxy = RateLimitingProxy::start(&pebble);
    let k = keter("acme-limited", &pebble, port, tls_port, &proxy.directory);
    deploy(&k, "limited", "v1", &["limited.test"], Own::None);
    let hosts = set(&["limited.test"]);
    let acme = acme_of(&k);
    acme.want(&hosts, |_| {});
    let failed = wait_status(&acme, &hosts, "retried", |s| s.failures >= 2, &pebble);
    let error = failed.last_error.clone().unwrap();
    assert_eq!(error.kind, ErrorKind::RateLimited, "{error:#?}");
    assert!(
        error.message.contains("too many new orders recently"),
        "{error:#?}"
    );
    // retry-max-delay is 4 s here, so the hour-long floor is 4 s; Retry-After (3 s) is
    // honoured as well.
    assert!(
        failed.next_attempt >= error.at + Duration::from_secs(RateLimitingProxy::RETRY_AFTER_SECS),
        "{failed:#?}"
    );
    assert_eq!(k.get("limited.test", "/").unwrap().body.trim(), "v1");
}
