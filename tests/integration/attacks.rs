//! Attacks on keter's own privileged file operations (README "Security": "What keter does as
//! root in trees others can change"): a hostile app races the hand-over of its next version's
//! folder and the opening of its static root to Nginx's workers, and a hostile deployer (not
//! root, a member of the group that may write `incoming/`) swaps a bundle's name for a symlink
//! to a bundle it cannot read, or for a FIFO, and names a key it cannot read. Each attacker is
//! `examples/attacker.rs`, running as the app's user or as the deployer; each race is run
//! until the code before these protections lost it, and the victim is looked at as root
//! afterwards.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::*;

const WAIT: Duration = Duration::from_secs(60);

/// The attacker built by `cargo test`.
fn attacker_binary() -> PathBuf {
    let attacker = hello_binary().with_file_name("attacker");
    assert!(
        attacker.exists(),
        "{} is missing: run `cargo test`",
        attacker.display()
    );
    attacker
}

/// A bundle of the attacker answering `version` on `host`, with `args` and more files.
fn attacker_bundle(
    path: &Path,
    version: &str,
    host: &str,
    args: &[&str],
    extra_yaml: &str,
    files: Vec<(String, Vec<u8>)>,
) {
    let mut all_args = vec!["--version-string".to_string(), version.to_string()];
    all_args.extend(args.iter().map(|a| a.to_string()));
    let args: Vec<String> = all_args.iter().map(|a| format!("{a:?}")).collect();
    let yaml = format!(
        "stanzas:\n  - type: webapp\n    exec: ../dist/attacker\n    args: [{}]\n    host: {host}\n{extra_yaml}",
        args.join(", ")
    );
    let mut b = BundleBuilder::new()
        .file("dist/attacker", fs::read(attacker_binary()).unwrap(), 0o755)
        .file("config/keter.yaml", yaml.into_bytes(), 0o644);
    for (name, content) in files {
        b = b.file(&name, content, 0o644);
    }
    b.write(path);
}

/// A folder of root's with `n` files `f0` ... that only root may read: what an attacker would
/// like to own or have served.
fn decoy(dir: &Path, n: usize, folder_mode: u32) -> PathBuf {
    let decoy = dir.join("decoy");
    fs::create_dir_all(&decoy).unwrap();
    for i in 0..n {
        let f = decoy.join(format!("f{i}"));
        fs::write(&f, format!("root's secret {i}\n")).unwrap();
        fs::set_permissions(&f, fs::Permissions::from_mode(0o600)).unwrap();
    }
    fs::set_permissions(&decoy, fs::Permissions::from_mode(folder_mode)).unwrap();
    decoy
}

/// The decoy's entries that are no longer root's alone: owner, group or mode changed.
fn changed(decoy: &Path, folder_mode: u32) -> Vec<String> {
    let mut out = Vec::new();
    let m = fs::symlink_metadata(decoy).unwrap();
    if (m.uid(), m.gid(), m.mode() & 0o7777) != (0, 0, folder_mode) {
        out.push(format!(
            "{} is {}:{} {:04o}",
            decoy.display(),
            m.uid(),
            m.gid(),
            m.mode() & 0o7777
        ));
    }
    for e in fs::read_dir(decoy).unwrap() {
        let p = e.unwrap().path();
        let m = fs::symlink_metadata(&p).unwrap();
        if (m.uid(), m.gid(), m.mode() & 0o7777) != (0, 0, 0o600) {
            out.push(format!(
                "{} is {}:{} {:04o}",
                p.display(),
                m.uid(),
                m.gid(),
                m.mode() & 0o7777
            ));
        }
    }
    out
}

/// Waits until keter's log has `n` lines that say the deploy of `app` ended (switched or
/// failed).
fn wait_deploys_ended(k: &Keter, app: &str, n: usize) {
    let deadline = Instant::now() + WAIT;
    loop {
        let log = k.log();
        let ended = log
            .lines()
            .filter(|l| {
                l.contains(&format!("{app}: switched to deploy"))
                    || l.contains(&format!("{app}: deploy of {app}.keter failed"))
            })
            .count();
        if ended >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "deploy {n} of {app} never ended:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What the attacker wrote to its report file in its home.
fn attacker_report(k: &Keter, app: &str) -> String {
    fs::read_to_string(k.root.join("home").join(app).join("attacker.report")).unwrap_or_default()
}

#[test]
fn an_app_racing_the_hand_over_of_its_next_version_owns_nothing_of_roots() {
    const ROUNDS: usize = 4;
    let k = Keter::start_with(
        "attack-handover",
        Opts {
            readiness_timeout: 20.0,
            drain_time: 0.5,
            ..Opts::default()
        },
    );
    let decoy = decoy(&k.dir.0, 2000, 0o700);
    let host = "race.example.com";
    let v1 = k.dir.0.join("race-v1.keter");
    attacker_bundle(&v1, "v1", host, &[], "", vec![]);
    k.deploy("race", &v1);
    k.wait_for(host, "v1", WAIT);
    // Each new version has a folder of 2000 files: while keter changes their owner, the
    // serving version (the same user) swaps the folder for a symlink to root's decoy.
    let big: Vec<(String, Vec<u8>)> = (0..2000)
        .map(|i| (format!("big/f{i}"), b"the app's own\n".to_vec()))
        .collect();
    for round in 0..ROUNDS {
        let r = k
            .get(host, &format!("/race-handover?decoy={}", decoy.display()))
            .unwrap();
        assert_eq!(r.body.trim(), "racing", "{r:?}");
        let next = k.dir.0.join(format!("race-r{round}.keter"));
        attacker_bundle(&next, &format!("r{round}"), host, &[], "", big.clone());
        k.deploy("race", &next);
        wait_deploys_ended(&k, "race", round + 2);
        let changed = changed(&decoy, 0o700);
        assert!(
            changed.is_empty(),
            "round {round}: the app made root's files its own: {} of them, e.g. {:?}\n\
             attacker: {}\n{}",
            changed.len(),
            &changed[..changed.len().min(3)],
            attacker_report(&k, "race"),
            k.log()
        );
    }
    // The race was run: the attacker reached the new folders once they were its own, and
    // swapped their folders then, too late to matter.
    let report = attacker_report(&k, "race");
    assert!(
        report.contains("handover: swapped"),
        "{report}\n{}",
        k.log()
    );
}

#[test]
fn an_app_racing_the_opening_of_its_static_root_gets_no_file_of_roots_served() {
    const ROUNDS: usize = 3;
    let k = Keter::start_with(
        "attack-static",
        Opts {
            readiness_timeout: 20.0,
            drain_time: 0.5,
            ..Opts::default()
        },
    );
    // Nginx's workers may pass through the decoy's folder: only its files' modes keep them out.
    let decoy = decoy(&k.dir.0, 2000, 0o755);
    let host = "site.example.com";
    let files = "files.example.com";
    let statics = format!("  - type: static-files\n    root: ../static\n    hosts: [{files}]\n");
    let index = vec![(
        "static/index.html".to_string(),
        b"the app's index\n".to_vec(),
    )];
    for round in 0..ROUNDS {
        // The new version itself races: at its start it makes static/d with 2000 files, and
        // swaps it for a symlink to the decoy the moment its group changes.
        let bundle = k.dir.0.join(format!("site-r{round}.keter"));
        let race = format!("static/d={}", decoy.display());
        attacker_bundle(
            &bundle,
            &format!("r{round}"),
            host,
            &["--race-static", &race],
            &statics,
            index.clone(),
        );
        k.deploy("site", &bundle);
        wait_deploys_ended(&k, "site", round + 1);
        let changed = changed(&decoy, 0o755);
        let served = k.get(files, "/d/f7").unwrap();
        assert!(
            changed.is_empty() && !served.body.contains("root's secret"),
            "round {round}: root's files were opened to Nginx's workers: {} of them, e.g. \
             {:?}; /d/f7 answered {} {:?}\nattacker: {}\n{}",
            changed.len(),
            &changed[..changed.len().min(3)],
            served.status,
            served.body,
            attacker_report(&k, "site"),
            k.log()
        );
        k.wait_for(host, &format!("r{round}"), WAIT);
        assert_eq!(
            k.get(files, "/index.html").unwrap().body,
            "the app's index\n"
        );
    }
}

/// Opens `incoming/` to the deployer's group, as the package does for its `keter` group.
fn open_incoming_to(k: &Keter, gid: u32) {
    nix::unistd::chown(&k.incoming(), None, Some(gid.into())).unwrap();
    fs::set_permissions(k.incoming(), fs::Permissions::from_mode(0o2770)).unwrap();
}

/// Gives `path` (not following a symlink) to `uid`:`gid`.
fn give(path: &Path, (uid, gid): (u32, u32)) {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid)).unwrap();
}

/// Runs the attacker as the deployer, exchanging the names `a` and `b` for `secs` seconds.
fn exchange_as(who: (u32, u32), a: &Path, b: &Path, secs: f64) -> std::process::Child {
    Command::new(attacker_binary())
        .arg("exchange")
        .arg(a)
        .arg(b)
        .arg(secs.to_string())
        .uid(who.0)
        .gid(who.1)
        .spawn()
        .unwrap()
}

/// A bundle only root can read: the deployer must never get it deployed.
fn secret_bundle(k: &Keter, host: &str) -> PathBuf {
    let folder = k.dir.0.join("secret");
    fs::create_dir_all(&folder).unwrap();
    fs::set_permissions(&folder, fs::Permissions::from_mode(0o700)).unwrap();
    let secret = folder.join("secret.keter");
    BundleBuilder::hello(&hello_yaml("root's secret bundle", host, &[])).write(&secret);
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).unwrap();
    // Its access time far in the past: reading it moves it (relatime), which tells whether
    // keter read it on the deployer's behalf, even for a deploy that was superseded.
    let long_ago = nix::sys::time::TimeSpec::new(1_000_000, 0);
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        &secret,
        &long_ago,
        &long_ago,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .unwrap();
    secret
}

/// Whether `path` was read since [`secret_bundle`] made it.
fn was_read(path: &Path) -> bool {
    fs::metadata(path).unwrap().atime() != 1_000_000
}

#[test]
fn a_deployer_swapping_a_bundle_for_a_link_to_one_it_cannot_read_gets_nothing() {
    let who = deployer();
    let k = Keter::start_with("attack-link", Opts::default());
    open_incoming_to(&k, who.1);
    let host = "swap.example.com";
    let secret = secret_bundle(&k, host);
    let name = k.incoming().join("swap.keter");
    BundleBuilder::hello(&hello_yaml("plain", host, &[])).write(&name);
    give(&name, who);
    let link = k.incoming().join(".swap-link");
    std::os::unix::fs::symlink(&secret, &link).unwrap();
    give(&link, who);
    k.wait_for(host, "plain", WAIT);
    // The name is a regular file and a symlink by turns, thousands of times a second, while
    // keter deploys whatever it opens; a client watches what is served.
    let mut attacker = exchange_as(who, &name, &link, 10.0);
    let mut seen = std::collections::BTreeMap::<String, usize>::new();
    while attacker.try_wait().unwrap().is_none() {
        if let Ok(r) = k.get(host, "/") {
            *seen.entry(r.body.trim().to_string()).or_default() += 1;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(attacker.wait().unwrap().success());
    // The deployer puts a plain bundle back; it is what serves.
    let plain = k.dir.0.join("plain.keter");
    BundleBuilder::hello(&hello_yaml("plain again", host, &[])).write(&plain);
    give(&plain, who);
    fs::rename(&plain, &name).unwrap();
    k.wait_for(host, "plain again", WAIT);
    assert!(
        !seen.contains_key("root's secret bundle") && !was_read(&secret),
        "keter read root's bundle on the deployer's behalf (served: {seen:?})\n{}",
        k.log()
    );
    assert!(
        k.log().contains("is a symlink; copy the bundle itself"),
        "{}",
        k.log()
    );
}

#[test]
fn a_deployer_swapping_a_bundle_for_a_fifo_leaves_no_deploy_hanging() {
    let who = deployer();
    let mut k = Keter::start_with("attack-fifo", Opts::default());
    open_incoming_to(&k, who.1);
    let host = "fifo.example.com";
    let name = k.incoming().join("fifo.keter");
    BundleBuilder::hello(&hello_yaml("plain", host, &[])).write(&name);
    give(&name, who);
    k.wait_for(host, "plain", WAIT);
    let fifo = k.incoming().join(".fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o660)).unwrap();
    give(&fifo, who);
    let mut attacker = exchange_as(who, &name, &fifo, 8.0);
    assert!(attacker.wait().unwrap().success());
    // A new version after the attack deploys: no deploy of the app hangs in the FIFO ...
    let v2 = k.dir.0.join("fifo-v2.keter");
    BundleBuilder::hello(&hello_yaml("v2", host, &[])).write(&v2);
    fs::copy(&v2, k.dir.0.join("fifo-v2.copy")).unwrap();
    give(&k.dir.0.join("fifo-v2.copy"), who);
    fs::rename(k.dir.0.join("fifo-v2.copy"), &name).unwrap();
    k.wait_for(host, "v2", WAIT);
    // ... and keter stops when asked (an unpack stuck in open() would hold it forever).
    let status = k.signal_and_wait(nix::sys::signal::Signal::SIGTERM);
    assert!(status.success(), "{status}\n{}", k.log());
}

#[test]
fn a_deployer_cannot_have_keter_serve_a_key_it_cannot_read() {
    let who = deployer();
    let k = Keter::start("attack-key");
    open_incoming_to(&k, who.1);
    // Root's certificate and key, readable by root alone (as certbot leaves them).
    let private = k.dir.0.join("letsencrypt");
    let (cert, key) = crate::stanzas::self_signed(&private, "keyed.example.com");
    fs::set_permissions(&private, fs::Permissions::from_mode(0o700)).unwrap();
    let yaml = format!(
        "stanzas:\n  - type: webapp\n    exec: ../dist/hello\n    args: [--version-string, keyed]\n    host: keyed.example.com\n    ssl: {{key: {}, certificate: {}}}\n",
        key.display(),
        cert.display()
    );
    let bundle = k.dir.0.join("keyed.keter");
    BundleBuilder::hello(&yaml).write(&bundle);
    // The deployer's copy is refused, naming the key and whose rights read it ...
    let mine = k.dir.0.join("keyed.deployer");
    fs::copy(&bundle, &mine).unwrap();
    give(&mine, who);
    fs::rename(&mine, k.incoming().join("keyed.keter")).unwrap();
    k.wait_deploy_result("keyed", DeployResult::Failed, WAIT);
    let log = k.log();
    let line = log
        .lines()
        .find(|l| l.contains("keyed: deploy of keyed.keter failed"))
        .unwrap();
    assert!(
        line.contains("stanzas[0].ssl") && line.contains("keter-test-deployer"),
        "{line}"
    );
    assert!(!log.contains("keyed: switched"), "{log}");
    // ... and the operator's (root's) copy of the same bundle deploys.
    fs::remove_file(k.incoming().join("keyed.keter")).unwrap();
    k.deploy("keyed", &bundle);
    k.wait_for("keyed.example.com", "keyed", WAIT);
    // A deployer's bundle that brings its own certificate is read by keter as it unpacks it.
    let (cert, key) = crate::stanzas::self_signed(&k.dir.0.join("own"), "own.example.com");
    let own = k.dir.0.join("own.deployer");
    BundleBuilder::hello(
        "stanzas:\n  - type: webapp\n    exec: ../dist/hello\n    args: [--version-string, own]\n    host: own.example.com\n    ssl: {key: ../tls/key.pem, certificate: ../tls/cert.pem}\n",
    )
    .file("tls/key.pem", fs::read(key).unwrap(), 0o600)
    .file("tls/cert.pem", fs::read(cert).unwrap(), 0o644)
    .write(&own);
    give(&own, who);
    fs::rename(&own, k.incoming().join("own.keter")).unwrap();
    k.wait_for("own.example.com", "own", WAIT);
}

#[test]
fn a_neighbour_reads_nothing_of_a_bundle_while_keter_unpacks_it() {
    let k = Keter::start_with(
        "attack-snoop",
        Opts {
            readiness_timeout: 20.0,
            ..Opts::default()
        },
    );
    let snooper = k.dir.0.join("snoop.keter");
    attacker_bundle(&snooper, "snoop", "snoop.example.com", &[], "", vec![]);
    k.deploy("snoop", &snooper);
    k.wait_for("snoop.example.com", "snoop", WAIT);
    let r = k
        .get(
            "snoop.example.com",
            "/snoop?app=victim&file=secret.txt&secs=30",
        )
        .unwrap();
    assert_eq!(r.body.trim(), "snooping", "{r:?}");
    // The secret comes first in the archive, then 64 MiB that take a while to unpack.
    let victim = k.dir.0.join("victim.keter");
    BundleBuilder::new()
        .file("secret.txt", b"the victim's secret\n".to_vec(), 0o644)
        .file("blob", noise(64 << 20, 1), 0o644)
        .file("dist/hello", fs::read(hello_binary()).unwrap(), 0o755)
        .file(
            "config/keter.yaml",
            hello_yaml("victim", "victim.example.com", &[]).into_bytes(),
            0o644,
        )
        .write(&victim);
    k.deploy("victim", &victim);
    k.wait_for("victim.example.com", "victim", WAIT);
    let report = attacker_report(&k, "snoop");
    assert!(
        !report.contains("snoop: read"),
        "a neighbour read the bundle while keter unpacked it:\n{report}"
    );
}

#[test]
fn an_app_cannot_have_keter_copy_another_apps_key_for_its_own_hosts() {
    let k = Keter::start_with(
        "attack-certs",
        Opts {
            readiness_timeout: 20.0,
            ..Opts::default()
        },
    );
    let tls = |dir: &str, cn: &str| {
        let (cert, key) = crate::stanzas::self_signed(&k.dir.0.join(dir), cn);
        vec![
            ("tls/cert.pem".to_string(), fs::read(cert).unwrap()),
            ("tls/key.pem".to_string(), fs::read(key).unwrap()),
        ]
    };
    let ssl = "    ssl: {key: ../tls/key.pem, certificate: ../tls/cert.pem}\n";
    let victim = k.dir.0.join("victim.keter");
    let victim_tls = tls("victim-tls", "victim.example.com");
    let victim_key = victim_tls[1].1.clone();
    attacker_bundle(
        &victim,
        "victim",
        "victim.example.com",
        &[],
        ssl,
        victim_tls,
    );
    k.deploy("victim", &victim);
    k.wait_for("victim.example.com", "victim", WAIT);
    // The copies keter made of the victim's certificate and key (root's, in etc/certs/).
    let copies: Vec<PathBuf> = fs::read_dir(k.root.join("etc/certs"))
        .unwrap()
        .flat_map(|d| fs::read_dir(d.unwrap().path()).unwrap())
        .map(|e| e.unwrap().path())
        .collect();
    let find = |end: &str| {
        copies
            .iter()
            .find(|p| p.to_string_lossy().ends_with(end))
            .unwrap_or_else(|| panic!("no *{end} in {copies:?}"))
            .clone()
    };
    let (key_copy, cert_copy) = (find("key.pem"), find("certificate.pem"));
    // The attacker's new version points its own certificate files at those copies as it
    // starts, before keter switches to it.
    let attacker = k.dir.0.join("attacker.keter");
    let link_key = format!("tls/key.pem={}", key_copy.display());
    let link_cert = format!("tls/cert.pem={}", cert_copy.display());
    attacker_bundle(
        &attacker,
        "attacker",
        "attacker.example.com",
        &["--link", &link_key, "--link", &link_cert],
        ssl,
        tls("attacker-tls", "attacker.example.com"),
    );
    k.deploy("attacker", &attacker);
    wait_deploys_ended(&k, "attacker", 1);
    for dir in fs::read_dir(k.root.join("etc/certs")).unwrap() {
        let dir = dir.unwrap().path();
        if !dir
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("attacker-")
        {
            continue;
        }
        for f in fs::read_dir(&dir).unwrap() {
            let f = f.unwrap().path();
            assert_ne!(
                fs::read(&f).unwrap(),
                victim_key,
                "keter copied the victim's key as {} for the attacker's hosts:\n{}",
                f.display(),
                k.log()
            );
        }
    }
}
