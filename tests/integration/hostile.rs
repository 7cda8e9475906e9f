//! Hostile bundles and injected faults. The rule for every case: the bad bundle is refused
//! with one log line naming it and the reason, the previous version of that app and every
//! other app keep serving, nothing is written outside the app's fresh folder in `temp/`, that
//! folder is removed, and the daemon keeps running.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::craft::{self, Entry};
use crate::support::*;

const APP: &str = "app.example.com";
const OTHER: &str = "other.example.com";
const WAIT: Duration = Duration::from_secs(30);

/// A keter serving `app` (v1) and `other` (o1), with small caps for the bomb tests.
fn serving(label: &str) -> Keter {
    let k = Keter::start_with(
        label,
        Opts {
            extra: "max-bundle-bytes: 30000000\nmax-bundle-entries: 20000\nmax-bundle-depth: 40\n"
                .into(),
            ..Opts::default()
        },
    );
    k.deploy_hello("app", "v1", APP, &[]);
    k.deploy_hello("other", "o1", OTHER, &[]);
    k.wait_for(APP, "v1", WAIT);
    k.wait_for(OTHER, "o1", WAIT);
    fs::create_dir_all(outside(&k)).unwrap();
    k
}

/// A folder next to keter's root that no bundle may reach.
fn outside(k: &Keter) -> PathBuf {
    k.dir.0.join("outside")
}

/// Copies `bytes` in as `app.keter` and checks the rule; returns the failure line.
fn refused(k: &Keter, bytes: &[u8], reason: &str) -> String {
    refused_as(k, "app", bytes, reason)
}

fn refused_as(k: &Keter, name: &str, bytes: &[u8], reason: &str) -> String {
    let folders_before = k.temp_folders();
    let marker = format!("{name}: deploy of {name}.keter failed");
    let before = k.log_count(&marker);
    let last = k.last_deploy(name);
    let staged = k.dir.0.join("staged.keter");
    fs::write(&staged, bytes).unwrap();
    k.deploy(name, &staged);
    k.wait_next_deploy(name, last.as_ref(), DeployResult::Failed, WAIT);
    let log = k.log();
    let line = log
        .lines()
        .rfind(|l| l.contains(&marker))
        .unwrap()
        .to_string();
    assert!(line.contains(reason), "expected {reason:?} in: {line}");
    assert_eq!(k.log_count(&marker), before + 1, "one line per refusal");
    assert_rule_holds(k, &folders_before);
    line
}

fn assert_rule_holds(k: &Keter, folders_before: &[String]) {
    assert_eq!(
        k.get(APP, "/").unwrap().body.trim(),
        "v1",
        "the previous version stopped serving"
    );
    assert_eq!(
        k.get(OTHER, "/").unwrap().body.trim(),
        "o1",
        "another app stopped serving"
    );
    // The refused version's folder goes in a stage of its own, which may end just after the
    // failure is reported.
    k.wait_temp_folders(folders_before.len(), WAIT);
    assert_eq!(
        k.temp_folders(),
        folders_before,
        "the refused version's folder is left"
    );
    assert_eq!(
        fs::read_dir(outside(k)).unwrap().count(),
        0,
        "something was written outside the bundle's folder"
    );
    for p in ["/tmp/keter-evil", "/keter-evil"] {
        assert!(!std::path::Path::new(p).exists(), "{p} was written");
    }
}

fn good_config() -> Entry {
    Entry::file(
        "config/keter.yaml",
        b"exec: ../dist/hello\nargs: [--version-string, evil]\nhost: app.example.com\n",
        0o644,
    )
}

fn hello_entry() -> Entry {
    Entry::file("dist/hello", &fs::read(hello_binary()).unwrap(), 0o755)
}

#[test]
fn not_gzip_truncated_empty_and_bad_checksum() {
    let k = serving("corrupt");
    refused(
        &k,
        b"this is not a gzip file at all",
        "not a complete gzip-compressed tar file",
    );
    let good = craft::bundle(&[good_config(), hello_entry()]);
    refused(
        &k,
        &good[..good.len() - 8],
        "not a complete gzip-compressed tar file",
    );
    refused(
        &k,
        &good[..good.len() / 2],
        "not a complete gzip-compressed tar file",
    );
    refused(&k, b"", "not a complete gzip-compressed tar file");
    let mut bad = good_config();
    bad.bad_checksum = true;
    refused(
        &k,
        &craft::bundle(&[bad, hello_entry()]),
        "not a complete gzip-compressed tar file",
    );
}

#[test]
fn a_bundle_written_slowly_in_place_deploys_once_after_the_write() {
    let k = serving("slow-write");
    let path = k.dir.0.join("v2.keter");
    BundleBuilder::hello(&hello_yaml("v2", APP, &[])).write(&path);
    let bytes = fs::read(&path).unwrap();
    {
        use std::io::Write;
        let mut f = fs::File::create(k.incoming().join("app.keter")).unwrap();
        for chunk in bytes.chunks(bytes.len() / 10 + 1) {
            f.write_all(chunk).unwrap();
            f.flush().unwrap();
            std::thread::sleep(Duration::from_millis(100));
            assert_eq!(k.get(APP, "/").unwrap().body.trim(), "v1");
        }
    }
    k.wait_for(APP, "v2", WAIT);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(k.log_count("app: switched to deploy"), 2, "{}", k.log());
    assert_eq!(k.log_count("deploy of app.keter failed"), 0, "{}", k.log());
}

#[test]
fn missing_config_invalid_yaml_and_wrong_types() {
    let k = serving("bad-config");
    refused(
        &k,
        &craft::bundle(&[hello_entry()]),
        "the bundle has no config/keter.yaml",
    );
    let yaml = |text: &str| {
        craft::bundle(&[
            Entry::file("config/keter.yaml", text.as_bytes(), 0o644),
            hello_entry(),
        ])
    };
    refused(
        &k,
        &yaml("exec: [unclosed\n"),
        "config/keter.yaml: invalid YAML",
    );
    refused(
        &k,
        &yaml("exec: ../dist/hello\nhost: app.example.com\nargs: {a: 1}\n"),
        "config/keter.yaml: args: expected a list of strings",
    );
    refused(
        &k,
        &yaml("stanzas: 5\n"),
        "config/keter.yaml: stanzas: expected a list of stanzas",
    );
}

#[test]
fn exec_missing_not_executable_or_outside() {
    let k = serving("bad-exec");
    let with = |exec: &str, extra: Vec<Entry>| {
        let mut entries = vec![Entry::file(
            "config/keter.yaml",
            format!("exec: {exec}\nhost: app.example.com\n").as_bytes(),
            0o644,
        )];
        entries.extend(extra);
        craft::bundle(&entries)
    };
    refused(
        &k,
        &with("../dist/missing", vec![hello_entry()]),
        "exec: ../dist/missing is not in the bundle",
    );
    refused(
        &k,
        &with(
            "../dist/hello",
            vec![Entry::file("dist/hello", b"#!/bin/sh\n", 0o644)],
        ),
        "exec: ../dist/hello is not executable",
    );
    refused(
        &k,
        &with("../../../../bin/sh", vec![hello_entry()]),
        "points outside the bundle",
    );
    refused(
        &k,
        &with(
            "../dist/sh",
            vec![Entry::symlink("dist/sh", "../../../../../../bin/sh")],
        ),
        "refused: dist/sh is a symlink pointing outside the bundle",
    );
}

#[test]
fn entries_with_dotdot_or_absolute_paths() {
    let k = serving("paths");
    refused(
        &k,
        &craft::bundle(&[good_config(), Entry::file("../../outside/x", b"x", 0o644)]),
        "refused: ../../outside/x contains '..'",
    );
    refused(
        &k,
        &craft::bundle(&[good_config(), Entry::file("/tmp/keter-evil", b"x", 0o644)]),
        "refused: /tmp/keter-evil is an absolute path",
    );
}

#[test]
fn symlinks_out_through_chains_and_replaced_by_files() {
    let k = serving("symlinks");
    let target = outside(&k).display().to_string();
    // An absolute link out, then a file written through it.
    refused(
        &k,
        &craft::bundle(&[
            good_config(),
            Entry::symlink("out", &target),
            Entry::file("out/pwned", b"x", 0o644),
        ]),
        "is a symlink to the absolute path",
    );
    // A relative link inside, then a file written through it: never followed.
    refused(
        &k,
        &craft::bundle(&[
            good_config(),
            Entry::dir("sub"),
            Entry::symlink("link", "sub"),
            Entry::file("link/x", b"x", 0o644),
        ]),
        "link/x goes through the symlink link",
    );
    // A chain that looks inside when read alone but resolves out: `s` is the root,
    // `t` is `s/..`, the root's parent.
    refused(
        &k,
        &craft::bundle(&[
            good_config(),
            Entry::symlink("s", "."),
            Entry::symlink("t", "s/.."),
        ]),
        "the symlink t resolves outside the bundle",
    );
    // A later entry replacing a symlink with a file of the same name.
    refused(
        &k,
        &craft::bundle(&[
            good_config(),
            Entry::symlink("x", "config/keter.yaml"),
            Entry::file("x", b"overwrite", 0o644),
        ]),
        "x would replace a symlink",
    );
}

#[test]
fn hard_links_devices_and_fifos() {
    let k = serving("special");
    refused(
        &k,
        &craft::bundle(&[good_config(), Entry::hardlink("h", "/etc/passwd")]),
        "h is a hard link",
    );
    refused(
        &k,
        &craft::bundle(&[good_config(), Entry::special("c", b'3')]),
        "c is a device file",
    );
    refused(
        &k,
        &craft::bundle(&[good_config(), Entry::special("b", b'4')]),
        "b is a device file",
    );
    refused(
        &k,
        &craft::bundle(&[good_config(), Entry::special("f", b'6')]),
        "f is a FIFO",
    );
}

#[test]
fn setuid_setgid_and_world_writable_bits_are_dropped() {
    let k = serving("modes");
    let yaml = b"exec: ../dist/hello\nargs: [--version-string, v2]\nhost: app.example.com\n";
    let bytes = craft::bundle(&[
        Entry::file("config/keter.yaml", yaml, 0o666),
        Entry::file("dist/hello", &fs::read(hello_binary()).unwrap(), 0o6777),
    ]);
    let staged = k.dir.0.join("modes.keter");
    fs::write(&staged, bytes).unwrap();
    k.deploy("app", &staged);
    k.wait_for(APP, "v2", WAIT);
    let folder = k.root.join("temp").join(
        k.temp_folders()
            .iter()
            .find(|f| f.starts_with("app-"))
            .unwrap(),
    );
    let mode = fs::metadata(folder.join("dist/hello"))
        .unwrap()
        .permissions()
        .mode()
        & 0o7777;
    // The unpacker drops setuid, setgid and world-writable bits; the hand-over to the app's
    // user keeps only the owner's bits.
    assert_eq!(
        mode, 0o700,
        "setuid/setgid/world-writable bits kept: {mode:o}"
    );
    let mode = fs::metadata(folder.join("config/keter.yaml"))
        .unwrap()
        .permissions()
        .mode()
        & 0o7777;
    assert_eq!(mode, 0o600);
}

#[test]
fn decompression_bomb_many_entries_and_deep_nesting_stop_at_caps() {
    let k = serving("bombs");
    let used_before = du(&k.root);
    let zeros = vec![0u8; 100 * 1024 * 1024];
    let bomb = craft::bundle(&[good_config(), Entry::file("zeros", &zeros, 0o644)]);
    assert!(
        bomb.len() < 1024 * 1024,
        "the bomb should be small: {}",
        bomb.len()
    );
    refused(
        &k,
        &bomb,
        "unpacks to more than 30000000 bytes (max-bundle-bytes)",
    );

    // A million empty entries: stopped at 20000.
    let mut tar = Vec::new();
    let mut entries = vec![good_config()];
    entries.extend((0..1_000_000).map(|i| Entry::file(&format!("e/{i}"), b"", 0o644)));
    tar.extend(craft::tar(&entries));
    drop(entries);
    refused(
        &k,
        &craft::gzip(&tar),
        "more than 20000 entries (max-bundle-entries)",
    );

    let deep: String = (0..60).map(|_| "d/").collect::<String>() + "f";
    refused(
        &k,
        &craft::bundle(&[good_config(), Entry::file(&deep, b"x", 0o644)]),
        "folders deep (max-bundle-depth is 40)",
    );
    // The root holds what it held before (the log grew by a few lines).
    let used_after = du(&k.root);
    assert!(
        used_after < used_before + 1024 * 1024,
        "disk not back: {used_before} -> {used_after} bytes under the root"
    );
}

/// Bytes of all files under `p`.
fn du(p: &std::path::Path) -> u64 {
    let meta = fs::symlink_metadata(p).unwrap();
    if meta.is_dir() {
        fs::read_dir(p)
            .unwrap()
            .flatten()
            .map(|e| du(&e.path()))
            .sum()
    } else {
        meta.len()
    }
}

#[test]
fn hostile_bundle_file_names() {
    let k = serving("names");
    let good = k.dir.0.join("good.keter");
    BundleBuilder::hello(&hello_yaml("n1", "n.example.com", &[])).write(&good);
    let long = format!("{}.keter", "a".repeat(240));
    for name in [
        "my app.keter",
        "a;b.keter",
        "a\nb.keter",
        "ünï.keter",
        long.as_str(),
        "-rf.keter",
    ] {
        fs::copy(&good, k.incoming().join(name)).unwrap();
        let shown = format!("incoming/{}: refused: the app name", name.escape_debug());
        k.wait_log(&shown, WAIT);
    }
    // A leading dot is a file still being copied in (cp then mv): never deployed, and not
    // refused either (checked below, once the symlink's line shows the scan went past it).
    fs::copy(&good, k.incoming().join(".n.keter")).unwrap();
    // A symlink in incoming/ pointing elsewhere is refused.
    std::os::unix::fs::symlink(&good, k.incoming().join("linked.keter")).unwrap();
    k.wait_log("is a symlink; copy the bundle itself into incoming/", WAIT);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(k.get("n.example.com", "/").unwrap().status, 404);
    assert!(
        !k.log().contains(".n.keter"),
        "a file still being copied in was acted on:\n{}",
        k.log()
    );
    assert_rule_holds(&k, &k.temp_folders());
    // Renamed to its final name, the same file deploys.
    fs::rename(k.incoming().join(".n.keter"), k.incoming().join("n.keter")).unwrap();
    k.wait_for("n.example.com", "n1", WAIT);
}

#[test]
fn host_names_that_would_break_out_of_server_name_are_refused() {
    let k = serving("injection");
    let long = format!("{}.example.com", vec!["a".repeat(60); 5].join("."));
    let evil = [
        "evil.com; } server { listen 80",
        "evil{.com",
        "evil}.com",
        "evil.com\\nserver_name x",
        "evil\\\".com",
        "$host.evil.com",
        "evil.com#x",
        "evil .com",
        "evil\\u0000.com",
        long.as_str(),
    ];
    for host in evil {
        let yaml = format!("exec: ../dist/hello\nhost: \"{host}\"\n");
        let line = refused(
            &k,
            &craft::bundle(&[
                Entry::file("config/keter.yaml", yaml.as_bytes(), 0o644),
                hello_entry(),
            ]),
            "config/keter.yaml: ",
        );
        assert!(
            line.contains("host: the host name") || line.contains("invalid YAML"),
            "{line}"
        );
    }
    // Other values that reach Nginx: redirect targets, reverse-proxy hosts, static roots.
    let yaml =
        |text: &str| craft::bundle(&[Entry::file("config/keter.yaml", text.as_bytes(), 0o644)]);
    refused(
        &k,
        &yaml(
            "stanzas:\n  - type: redirect\n    hosts: [r.example.com]\n    actions: [{url: \"https://evil.example.com/$host;x\"}]\n",
        ),
        "contains '$'",
    );
    refused(
        &k,
        &yaml(
            "stanzas:\n  - type: reverse-proxy\n    reversing-host: p.example.com\n    reversed-host: \"x;y\"\n    reversed-port: 80\n",
        ),
        "reversed-host: the host name \"x;y\" is not valid",
    );
    let static_bundle = craft::bundle(&[
        Entry::file(
            "config/keter.yaml",
            b"stanzas:\n  - type: static-files\n    hosts: [s.example.com]\n    root: \"../a;b\"\n",
            0o644,
        ),
        Entry::dir("a;b"),
    ]);
    refused(&k, &static_bundle, "cannot be written into an Nginx file");
    // Nothing of it reached the live configuration.
    let out = std::process::Command::new("nginx")
        .args(["-T", "-q", "-e", "stderr", "-p"])
        .arg(k.root.join("nginx"))
        .arg("-c")
        .arg(k.root.join("nginx/nginx.conf"))
        .output()
        .unwrap();
    let dump = String::from_utf8_lossy(&out.stdout);
    assert!(dump.contains("server_name app.example.com"), "{dump}");
    for needle in ["evil", "x;y", "a;b"] {
        assert!(!dump.contains(needle), "{needle} reached Nginx:\n{dump}");
    }
}

#[test]
fn a_bundle_env_cannot_override_the_port() {
    let k = serving("env-override");
    // APPROOT may be set, as in Keter; the port is keter's (its readiness check uses it).
    for var in ["PORT", "YESOD_PORT"] {
        let yaml = format!("exec: ../dist/hello\nhost: app.example.com\nenv: {{{var}: \"1\"}}\n");
        refused(
            &k,
            &craft::bundle(&[
                Entry::file("config/keter.yaml", yaml.as_bytes(), 0o644),
                hello_entry(),
            ]),
            &format!("env.{var}: {var} is set by keter to the port it gives the app"),
        );
    }
}

#[test]
fn a_configuration_nginx_rejects_leaves_the_live_files_untouched() {
    let k = serving("nginx-t");
    let live = fs::read_to_string(k.root.join("nginx/apps/app.conf")).unwrap();
    // A valid-looking reverse proxy to a name that does not resolve: only `nginx -t` sees it.
    let yaml = "stanzas:\n  - type: webapp\n    exec: ../dist/hello\n    args: [--version-string, v2]\n    hosts: [app.example.com]\n  - type: reverse-proxy\n    reversing-host: p.example.com\n    reversed-host: no-such-host.invalid\n    reversed-port: 80\n";
    let line = refused(
        &k,
        &craft::bundle(&[
            Entry::file("config/keter.yaml", yaml.as_bytes(), 0o644),
            hello_entry(),
        ]),
        "nginx -t rejected the configuration",
    );
    assert!(
        line.contains("no-such-host.invalid"),
        "Nginx's message is missing: {line}"
    );
    assert_eq!(
        fs::read_to_string(k.root.join("nginx/apps/app.conf")).unwrap(),
        live
    );
    // The new process was stopped and its port freed.
    assert!(k.log().contains("app: stopped pid"), "{}", k.log());
    // And the next good deploy goes through (no broken file left behind, Dokku's problem).
    k.deploy_hello("app", "v3", APP, &[]);
    k.wait_for(APP, "v3", WAIT);
}

#[test]
fn nginx_that_cannot_confirm_keeps_the_old_version() {
    let k = Keter::start_with(
        "nginx-stuck",
        Opts {
            reload_timeout: 2.0,
            ..Opts::default()
        },
    );
    k.deploy_hello("app", "v1", APP, &[]);
    k.wait_for(APP, "v1", WAIT);
    let v1 = k
        .get(APP, "/pid")
        .unwrap()
        .body
        .trim()
        .parse::<i32>()
        .unwrap();
    // A master that cannot act on SIGHUP: its workers keep serving the old configuration.
    let master = nix::unistd::Pid::from_raw(k.nginx_pid());
    nix::sys::signal::kill(master, nix::sys::signal::Signal::SIGSTOP).unwrap();
    k.deploy_hello("app", "v2", APP, &[]);
    let failed = k.wait_deploy_result("app", DeployResult::Failed, WAIT);
    assert_eq!(failed.error_kind.as_deref(), Some("nginx"), "{failed:?}");
    k.wait_log("Nginx did not take the new configuration", WAIT);
    assert!(
        alive(v1),
        "the old version was stopped although Nginx never confirmed the switch"
    );
    assert_eq!(k.get(APP, "/").unwrap().body.trim(), "v1");
    nix::sys::signal::kill(master, nix::sys::signal::Signal::SIGCONT).unwrap();
    k.deploy_hello("app", "v3", APP, &[]);
    k.wait_for(APP, "v3", WAIT);
}

#[test]
fn a_stale_listener_on_the_next_port_is_skipped() {
    // Occupy the first port of the range with a process that would answer anything.
    let first = free_port();
    let stale = std::net::TcpListener::bind(("127.0.0.1", first)).expect("bind the stale port");
    let k = Keter::start_with(
        "stale-port",
        Opts {
            first_port: Some(first),
            ports: 5,
            ..Opts::default()
        },
    );
    k.deploy_hello("app", "v1", APP, &[]);
    k.wait_for(APP, "v1", WAIT);
    let env = k.get(APP, "/env").unwrap().body;
    assert!(
        !env.contains(&format!("PORT={first}\n")),
        "the stale port was handed out: {env}"
    );
    drop(stale);
}

#[test]
fn good_crash_good_two_hundred_times_never_gets_stuck() {
    let k = Keter::start_with(
        "churn",
        Opts {
            readiness_timeout: 3.0,
            drain_time: 1.0,
            stop_timeout: 1.0,
            ports: 40,
            ..Opts::default()
        },
    );
    let dir = &k.dir.0;
    let good = |i: usize| {
        let p = dir.join(format!("good{}.keter", i % 2));
        if !p.exists() {
            BundleBuilder::hello(&hello_yaml(&format!("good{}", i % 2), APP, &[])).write(&p);
        }
        p
    };
    let crash = dir.join("crash.keter");
    BundleBuilder::hello(&hello_yaml("crash", APP, &["--crash"])).write(&crash);
    for i in 0..200 {
        k.deploy_linked("app", &good(i));
        k.deploy_linked("app", &crash);
        k.deploy_linked("app", &good(i + 1));
        if i % 50 == 49 {
            k.wait_for(APP, &format!("good{}", (i + 1) % 2), WAIT);
        }
    }
    k.wait_for(APP, "good0", WAIT);
    // Nothing leaked: one version's folder, one app process, its port only.
    k.wait_temp_folders(1, WAIT);
    let journal = fs::read_to_string(k.root.join("etc/processes")).unwrap();
    assert_eq!(
        journal.lines().filter(|l| !l.starts_with('#')).count(),
        1,
        "{journal}"
    );
}

#[test]
fn ten_uploads_in_a_second_and_a_delete_mid_deploy() {
    let k = Keter::start_with(
        "burst",
        Opts {
            drain_time: 1.0,
            ..Opts::default()
        },
    );
    let paths: Vec<PathBuf> = (0..10)
        .map(|i| {
            let p = k.dir.0.join(format!("b{i}.keter"));
            BundleBuilder::hello(&hello_yaml(&format!("b{i}"), APP, &["--delay-ms", "50"]))
                .write(&p);
            p
        })
        .collect();
    for p in &paths {
        k.deploy("app", p);
        std::thread::sleep(Duration::from_millis(80));
    }
    k.wait_for(APP, "b9", WAIT);
    // A delete in the middle of a deploy (the app takes a second to listen) wins.
    let slow = k.dir.0.join("slow.keter");
    BundleBuilder::hello(&hello_yaml("slow", APP, &["--delay-ms", "1000"])).write(&slow);
    k.deploy("app", &slow);
    k.wait_app(
        "app",
        "waiting for the slow version to get ready",
        WAIT,
        |s| s.deploy_stage.as_deref() == Some("readiness"),
    );
    fs::remove_file(k.incoming().join("app.keter")).unwrap();
    k.wait_stopped("app", WAIT);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(k.get(APP, "/").unwrap().status, 404);
    assert!(k.temp_folders().is_empty(), "{:?}", k.temp_folders());
    let journal = fs::read_to_string(k.root.join("etc/processes")).unwrap();
    assert_eq!(
        journal.lines().filter(|l| !l.starts_with('#')).count(),
        0,
        "{journal}"
    );
}

#[test]
fn a_full_disk_fails_cleanly_and_never_blocks_the_app() {
    let k = Keter::start_with(
        "disk-full",
        Opts {
            tmpfs_mib: Some(40),
            ..Opts::default()
        },
    );
    k.deploy_hello("app", "v1", APP, &[]);
    k.wait_for(APP, "v1", WAIT);
    let journal_before = fs::read_to_string(k.root.join("etc/processes")).unwrap();

    // Unpacking past the free space: refused, the half-written folder removed.
    let folders_before = k.temp_folders();
    let zeros = vec![0u8; 64 * 1024 * 1024];
    let bytes = craft::bundle(&[
        good_config(),
        hello_entry(),
        Entry::file("big", &zeros, 0o644),
    ]);
    let staged = k.dir.0.join("big.keter");
    fs::write(&staged, bytes).unwrap();
    k.deploy("app", &staged);
    let failed = k.wait_deploy_result("app", DeployResult::Failed, WAIT);
    assert!(
        failed
            .error
            .as_ref()
            .is_some_and(|e| e.contains("No space left on device")),
        "{failed:?}"
    );
    // The half-written folder goes in a stage that may end just after the failure is reported.
    k.wait_temp_folders(folders_before.len(), WAIT);
    assert_eq!(k.temp_folders(), folders_before);
    assert_eq!(k.get(APP, "/").unwrap().body.trim(), "v1");

    // Fill the disk: the app's output is dropped, never blocking it; the journal keeps its
    // last complete version when it cannot be rewritten.
    let filler = k.root.join("filler");
    let mut f = fs::File::create(&filler).unwrap();
    let chunk = vec![1u8; 1024 * 1024];
    use std::io::Write;
    while f.write_all(&chunk).is_ok() {}
    let _ = f.flush();
    let start = Instant::now();
    assert_eq!(
        k.get(APP, "/print?n=5000").unwrap().body.trim(),
        "printed 5000"
    );
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "the app was blocked on its output"
    );
    let pid: i32 = k.get(APP, "/pid").unwrap().body.trim().parse().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    k.wait_log("journal: cannot write", WAIT);
    let journal = fs::read_to_string(k.root.join("etc/processes")).unwrap();
    assert!(
        journal.starts_with("# keter state journal"),
        "half-written journal: {journal:?}"
    );
    assert_eq!(
        journal, journal_before,
        "the journal changed on a full disk"
    );
    // Space again: everything goes on.
    drop(f);
    fs::remove_file(&filler).unwrap();
    let deadline = Instant::now() + WAIT;
    while k
        .get(APP, "/")
        .map(|r| r.body.trim() != "v1")
        .unwrap_or(true)
    {
        assert!(
            Instant::now() < deadline,
            "the app never came back:\n{}",
            k.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    k.deploy_hello("app", "v2", APP, &[]);
    k.wait_for(APP, "v2", WAIT);
}

/// `keter check -c CONFIG BUNDLE` with the binary the daemon runs: exit code and all output.
fn check_with(k: &Keter, bundle: &std::path::Path) -> (i32, String) {
    let out = std::process::Command::new(&k.bin)
        .arg("check")
        .arg(bundle)
        .arg("-c")
        .arg(&k.config_path)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// A reverse proxy to keter's status interface would publish every app's state, log lines and
/// configuration through Nginx; one to another app's port would reach it past its Nginx
/// settings (basic-auth). `keter check` and the deploy refuse both, naming the key, and Nginx
/// never serves the status interface.
#[test]
fn a_reverse_proxy_to_keters_status_interface_or_an_apps_port_is_refused() {
    let k = Keter::start_with(
        "proxy-to-status",
        Opts {
            status: StatusAt::Tcp,
            ..Opts::default()
        },
    );
    let Some(keter::status::StatusAddress::Tcp(status)) = k.status else {
        unreachable!("a TCP status address was asked for")
    };
    // An app whose port the last bundle aims at, past its basic-auth.
    let guarded = k.dir.0.join("guarded.keter");
    BundleBuilder::hello(&format!(
        "stanzas:\n  - type: webapp\n    exec: ../dist/hello\n    args: [--version-string, g1]\n    hosts: [{APP}]\n    middleware:\n      - basic-auth: {{realm: staff, creds: {{jon: rocks}}}}\n"
    ))
    .write(&guarded);
    k.deploy("guarded", &guarded);
    let deadline = Instant::now() + WAIT;
    while !k.get(APP, "/").is_ok_and(|r| r.status == 401) {
        assert!(Instant::now() < deadline, "never deployed:\n{}", k.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let conf = k.root.join("nginx/apps/guarded.conf");
    let app_port: u16 = fs::read_to_string(&conf)
        .unwrap()
        .lines()
        .find_map(|l| l.trim().strip_prefix("server 127.0.0.1:"))
        .and_then(|p| p.trim_end_matches(';').parse().ok())
        .expect("an upstream port in the app's Nginx file");

    for (name, host, port, reason) in [
        (
            "leak",
            "127.0.0.1",
            status.port(),
            "keter's own status interface",
        ),
        (
            "leakname",
            "localhost",
            status.port(),
            "keter's own status interface",
        ),
        ("bypass", "127.0.0.1", app_port, "in port-range"),
    ] {
        let yaml = format!(
            "stanzas:\n  - type: reverse-proxy\n    reversing-host: {name}.example.com\n    reversed-host: {host}\n    reversed-port: {port}\n"
        );
        let bundle = k.dir.0.join(format!("{name}.keter"));
        BundleBuilder::new()
            .file("config/keter.yaml", yaml.into_bytes(), 0o644)
            .write(&bundle);
        let (code, out) = check_with(&k, &bundle);
        assert_eq!(
            code, 1,
            "keter check accepted a reverse proxy to {host}:{port}:\n{out}"
        );
        assert!(
            out.contains("stanzas[0].reversed-port") && out.contains(reason),
            "{out}"
        );
        k.deploy(name, &bundle);
        let marker = format!("{name}: deploy of {name}.keter failed");
        k.wait_deploy_result(name, DeployResult::Failed, WAIT);
        let line = k
            .log()
            .lines()
            .rfind(|l| l.contains(&marker))
            .unwrap()
            .to_string();
        assert!(line.contains("stanzas[0].reversed-port"), "{line}");
        // Nginx has nothing for that host: its 404, never what the status interface knows.
        for path in ["/", "/api/apps", "/apps/guarded"] {
            let r = k.get(&format!("{name}.example.com"), path).unwrap();
            assert_eq!(r.status, 404, "{path}: {r:?}");
            assert!(
                !r.body.contains("keter_version") && !r.body.contains("guarded"),
                "{r:?}"
            );
        }
    }
    assert_eq!(
        k.get(APP, "/").unwrap().status,
        401,
        "the app lost its basic-auth"
    );
}
