//! What the Nginx files keter writes let through (README, "Generated Nginx files"): the
//! symlinks an app plants in its static root after its deploy, and Nginx object names of apps
//! whose names are alike, with an app file written by an earlier keter beside new ones.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::{Gid, Uid, User, chown};

use crate::craft::{self, Entry};
use crate::support::*;

const WAIT: Duration = Duration::from_secs(30);

/// `GET path` with `Host: host` and more header lines: (status, body).
fn get_with(k: &Keter, host: &str, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let mut s = TcpStream::connect(k.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut req = format!("GET {path} HTTP/1.0\r\nHost: {host}\r\n");
    for (name, value) in headers {
        req.push_str(&format!("{name}: {value}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, body.to_string())
}

/// Waits until `GET path` on `host` answers `status`, and goes on answering it for 300 ms:
/// Nginx's workers from before a reload may still accept a connection for a moment after it
/// (as `Keter::wait_for` waits), and answer by the configuration before it.
fn wait_status(k: &Keter, host: &str, path: &str, status: u16) {
    let start = Instant::now();
    let mut first: Option<Instant> = None;
    loop {
        if get_with(k, host, path, &[]).0 == status {
            let since = *first.get_or_insert_with(Instant::now);
            if since.elapsed() >= Duration::from_millis(300) {
                return;
            }
        } else {
            first = None;
        }
        assert!(
            start.elapsed() < WAIT,
            "{host}{path} never answered {status}:\n{}",
            k.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Writes `entries` as a bundle and copies it in as `name`.
fn deploy_entries(k: &Keter, name: &str, entries: &[Entry]) {
    let path = k.dir.0.join(format!("{name}.keter"));
    fs::write(&path, craft::bundle(entries)).unwrap();
    k.deploy(name, &path);
}

fn hello_entry() -> Entry {
    Entry::file("dist/hello", &fs::read(hello_binary()).unwrap(), 0o755)
}

/// The folder `temp/NAME-N` of the version of `app` that serves.
fn version_folder(k: &Keter, app: &str) -> PathBuf {
    let folders: Vec<String> = k
        .temp_folders()
        .into_iter()
        .filter(|f| {
            f.strip_prefix(app)
                .and_then(|n| n.strip_prefix('-'))
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        })
        .collect();
    assert_eq!(folders.len(), 1, "{folders:?}");
    k.root.join("temp").join(&folders[0])
}

/// The uid the example app serving `host` runs as.
fn uid_of(k: &Keter, host: &str) -> u32 {
    let who = k.get(host, "/whoami").unwrap().body;
    who.lines()
        .find_map(|l| l.strip_prefix("Uid: "))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("/whoami on {host} answered {who:?}"))
}

/// Has the example app serving `host` make `link` (relative to its folder, or absolute) a
/// symlink to `target`, as the app's own user.
fn plant(k: &Keter, host: &str, target: &Path, link: &str) {
    let r = k
        .get(
            host,
            &format!("/symlink?target={}&link={link}", target.display()),
        )
        .unwrap();
    assert_eq!(
        (r.status, r.body.trim()),
        (200, "ok"),
        "the app could not link {link} to {}",
        target.display()
    );
}

/// Which of `paths` (with what each leads to) `host` serves: each must answer 403 or 404,
/// and no answer may hold any of `secrets`.
fn leaks_of(k: &Keter, host: &str, paths: &[(&str, &str)], secrets: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    for (path, what) in paths {
        let (status, body) = get_with(k, host, path, &[]);
        let leaked: Vec<&&str> = secrets.iter().filter(|s| body.contains(**s)).collect();
        if !matches!(status, 403 | 404) || !leaked.is_empty() {
            let start: String = body.chars().take(120).collect();
            out.push(format!(
                "{host}{path} ({what}) answered {status}, {leaked:?} in {start:?}"
            ));
        }
    }
    out
}

#[test]
fn nginx_never_follows_a_symlink_an_app_plants_out_of_what_it_owns() {
    // An operator's folder outside bundles, with a link of the operator's own and a folder the
    // operator gives the app (an upload folder, say).
    let shared = TempDir::new("links-shared");
    let site = shared.0.join("site");
    fs::create_dir_all(site.join("uploads")).unwrap();
    fs::create_dir_all(shared.0.join("releases")).unwrap();
    fs::write(
        shared.0.join("releases/current.txt"),
        "the current release\n",
    )
    .unwrap();
    std::os::unix::fs::symlink("../releases/current.txt", site.join("current.txt")).unwrap();
    for p in [
        &shared.0,
        &site,
        &site.join("uploads"),
        &shared.0.join("releases"),
    ] {
        set_mode(p, 0o755);
    }
    set_mode(&shared.0.join("releases/current.txt"), 0o644);
    let k = Keter::start_with(
        "links",
        Opts {
            extra: format!("allowed-static-roots: [{}]\n", shared.0.display()),
            ..Opts::default()
        },
    );
    // Nginx's log files belong to its workers' user (Debian's /var/log/nginx/error.log is
    // www-data's, mode 0640): a file of theirs that no one else may read.
    let workers = User::from_name("www-data")
        .unwrap()
        .expect("the user www-data (Debian's nginx package creates it)");
    let log_dir = k.dir.0.join("nginx-log");
    fs::create_dir_all(&log_dir).unwrap();
    set_mode(&log_dir, 0o755);
    let error_log = log_dir.join("error.log");
    fs::write(&error_log, "an error log line of Nginx's workers\n").unwrap();
    chown(&error_log, Some(workers.uid), Some(workers.gid)).unwrap();
    set_mode(&error_log, 0o640);

    // The neighbour: static files behind basic authentication, whose password file Nginx's
    // workers read from worker-files/.
    deploy_entries(
        &k,
        "other",
        &[
            Entry::file(
                "config/keter.yaml",
                b"stanzas:\n  - type: static-files\n    root: ../public\n    hosts: [other.example.com]\n    middleware: [{basic-auth: {realm: Staff, creds: {jon: rocks}}}]\n",
                0o644,
            ),
            Entry::file("public/private.txt", b"the neighbour's private page\n", 0o644),
        ],
    );
    wait_status(&k, "other.example.com", "/private.txt", 401);
    let passwords = k.root.join("nginx/worker-files/apps/other");
    let password_file = fs::read_dir(&passwords)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "htpasswd"))
        .expect("the neighbour's password file");
    let password_name = password_file
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let password_line = fs::read_to_string(&password_file).unwrap();
    assert!(password_line.starts_with("jon:{SSHA}"), "{password_line}");
    let neighbour_public = version_folder(&k, "other").join("public");

    // The app: a webapp that plants links as its own user, and two static-files stanzas, one
    // in its bundle (with links of its own that stay inside the bundle) and one in the
    // operator's folder.
    let yaml = format!(
        "stanzas:\n  - type: webapp\n    exec: ../dist/hello\n    args: [--version-string, site]\n    hosts: [site.example.com]\n  - type: static-files\n    root: ../static\n    hosts: [files.example.com]\n    directory-listing: true\n  - type: static-files\n    root: {}\n    hosts: [shared.example.com]\n    directory-listing: true\n",
        site.display()
    );
    deploy_entries(
        &k,
        "site",
        &[
            hello_entry(),
            Entry::file("config/keter.yaml", yaml.as_bytes(), 0o644),
            Entry::file("static/hello.txt", b"a file of the app\n", 0o644),
            Entry::file("assets/inside.txt", b"inside the bundle\n", 0o644),
            Entry::symlink("static/inside.txt", "../assets/inside.txt"),
            Entry::file("manual/page.txt", b"a page of the manual\n", 0o644),
            Entry::symlink("static/manual", "../manual"),
        ],
    );
    k.wait_for("site.example.com", "site", WAIT);
    let app_uid = uid_of(&k, "site.example.com");
    chown(
        &site.join("uploads"),
        Some(Uid::from_raw(app_uid)),
        Some(Gid::from_raw(app_uid)),
    )
    .unwrap();

    // The bundle's own links, and the operator's, are followed.
    let served = [
        ("files.example.com", "/hello.txt", "a file of the app"),
        ("files.example.com", "/inside.txt", "inside the bundle"),
        (
            "files.example.com",
            "/manual/page.txt",
            "a page of the manual",
        ),
        ("shared.example.com", "/current.txt", "the current release"),
    ];
    let check_served = || {
        for (host, path, body) in served {
            let (status, text) = get_with(&k, host, path, &[]);
            assert_eq!((status, text.trim()), (200, body), "{host}{path}");
        }
    };
    check_served();

    // The app links its static root, and the operator's folder it may write, to what it does
    // not own: keter's worker files with the neighbour's password file, the neighbour's
    // static root (behind authentication), Nginx's log, /etc.
    let worker_files = k.root.join("nginx/worker-files");
    let links: [(&Path, &str); 7] = [
        (&worker_files, "worker-files"),
        (&password_file, "password"),
        (&neighbour_public, "neighbour"),
        (&neighbour_public.join("private.txt"), "neighbour-page"),
        (&error_log, "nginx-log"),
        (Path::new("/etc"), "etc"),
        (Path::new("/etc/passwd"), "passwd"),
    ];
    for (target, name) in links {
        plant(&k, "site.example.com", target, &format!("static/{name}"));
        let upload = site.join("uploads").join(name);
        plant(
            &k,
            "site.example.com",
            target,
            &upload.display().to_string(),
        );
    }
    let secrets = [
        password_line.trim(),
        "jon:",
        "the neighbour's private page",
        "an error log line",
        "root:x:0:0",
        &password_name,
    ];
    let through_folder = format!("/worker-files/apps/other/{password_name}");
    let wanted = [
        ("/worker-files/", "keter's worker files, listed"),
        (
            through_folder.as_str(),
            "the neighbour's password file, through a linked folder",
        ),
        ("/password", "the neighbour's password file"),
        ("/neighbour/private.txt", "the neighbour's static root"),
        ("/neighbour/", "the neighbour's static root, listed"),
        ("/neighbour-page", "the neighbour's page"),
        ("/nginx-log", "Nginx's error log"),
        ("/etc/passwd", "/etc, linked"),
        ("/etc/", "/etc, listed"),
        ("/passwd", "/etc/passwd"),
    ];
    let mut leaks = leaks_of(&k, "files.example.com", &wanted, &secrets);
    let in_uploads: Vec<(String, &str)> = wanted
        .iter()
        .map(|(path, what)| (format!("/uploads{path}"), *what))
        .collect();
    let in_uploads: Vec<(&str, &str)> = in_uploads.iter().map(|(p, w)| (p.as_str(), *w)).collect();
    leaks.extend(leaks_of(&k, "shared.example.com", &in_uploads, &secrets));
    check_served();

    // The app replaces its static root itself with a link: to the neighbour's password files,
    // then to the neighbour's static root.
    plant(&k, "site.example.com", &passwords, "static");
    leaks.extend(leaks_of(
        &k,
        "files.example.com",
        &[
            ("/", "the neighbour's password folder as the root, listed"),
            (
                &format!("/{password_name}"),
                "the neighbour's password file, in the folder as the root",
            ),
        ],
        &secrets,
    ));
    plant(&k, "site.example.com", &neighbour_public, "static");
    leaks.extend(leaks_of(
        &k,
        "files.example.com",
        &[
            ("/private.txt", "the neighbour's page, its root as the root"),
            ("/", "the neighbour's static root as the root, listed"),
        ],
        &secrets,
    ));
    assert!(
        leaks.is_empty(),
        "Nginx followed the app's links:\n{}",
        leaks.join("\n")
    );
    // The neighbour's own page still asks for its password.
    assert_eq!(
        get_with(&k, "other.example.com", "/private.txt", &[]).0,
        401
    );
}

/// A bundle of the example app with one webapp stanza per (version, host).
fn webapps(k: &Keter, name: &str, apps: &[(&str, &str)], middleware: &str) {
    let mut yaml = String::from("stanzas:\n");
    for (version, host) in apps {
        yaml.push_str(&format!(
            "  - type: webapp\n    exec: ../dist/hello\n    args: [--version-string, {version}]\n    hosts: [{host}]\n{middleware}"
        ));
    }
    deploy_entries(
        k,
        name,
        &[
            hello_entry(),
            Entry::file("config/keter.yaml", yaml.as_bytes(), 0o644),
        ],
    );
}

/// A throttle counting requests by `header` within the zone of their `X-Tenant` header
/// (Nginx keys it with a `map`), as a stanza's middleware.
fn throttle(header: &str, limit: u32) -> String {
    format!(
        "    middleware:\n      - rate-limiter:\n          zone_by: {{header: X-Tenant}}\n          throttles:\n            - {{name: t, limit: {limit}, period: 60, algorithm: FixedWindow, identifier_by: {{header: {header}}}}}\n"
    )
}

#[test]
fn apps_named_alike_are_each_served_by_their_own() {
    let k = Keter::start_with(
        "names",
        Opts {
            ports: 40,
            ..Opts::default()
        },
    );
    // `web`'s second upstream was named as `web-1`'s only one; `Shop` and `shop` differ in
    // case only, which Nginx ignores in upstream and variable names.
    let apps: [(&str, &[(&str, &str)]); 5] = [
        (
            "web",
            &[
                ("web-a", "a.web.example.com"),
                ("web-b", "b.web.example.com"),
            ],
        ),
        ("web-1", &[("web-1", "web-1.example.com")]),
        ("Shop", &[("Shop", "big-shop.example.com")]),
        ("shop", &[("shop", "small-shop.example.com")]),
        ("web_1", &[("web_1", "web-underscore-1.example.com")]),
    ];
    for (name, stanzas) in apps {
        webapps(&k, name, stanzas, &throttle("X-Key", 100));
        for (version, host) in stanzas {
            k.wait_for(host, version, WAIT);
        }
    }
    for (_, stanzas) in apps {
        for (version, host) in stanzas {
            assert_eq!(k.get(host, "/").unwrap().body.trim(), *version, "{host}");
        }
    }
}

#[test]
fn apps_whose_names_differ_in_case_count_by_their_own_throttles() {
    let k = Keter::start("names-case");
    // Two static sites (no upstream to collide), each counting requests by a header of its
    // own: two requests per minute and client.
    for (name, host, header) in [
        ("Files", "big-files.example.com", "X-Big-Key"),
        ("files", "small-files.example.com", "X-Small-Key"),
    ] {
        let yaml = format!(
            "stanzas:\n  - type: static-files\n    root: ../static\n    hosts: [{host}]\n{}",
            throttle(header, 2)
        );
        deploy_entries(
            &k,
            name,
            &[
                Entry::file("config/keter.yaml", yaml.as_bytes(), 0o644),
                Entry::file("static/index.txt", name.as_bytes(), 0o644),
            ],
        );
        // Without the header a request is not counted.
        wait_status(&k, host, "/index.txt", 200);
    }
    for (host, header) in [
        ("big-files.example.com", "X-Big-Key"),
        ("small-files.example.com", "X-Small-Key"),
    ] {
        let headers = [(header, "client"), ("X-Tenant", "tenant")];
        let statuses: Vec<u16> = (0..3)
            .map(|_| get_with(&k, host, "/index.txt", &headers).0)
            .collect();
        assert_eq!(
            statuses,
            [200, 200, 429],
            "{host} did not count requests by its own {header}"
        );
    }
}

/// How keter named Nginx objects before names were encoded (an upstream `keter-NAME`, a zone
/// `keter_NAME_N`, a variable `keter_rl_NAME_N`), for an app name of letters and `-`.
fn earlier_names(text: &str, app: &str, encoded: &str) -> String {
    let escaped = app.replace('-', "_h");
    let mut text = text.to_string();
    for n in 1..=4 {
        text = text
            .replace(
                &format!("${encoded}_rl{n}"),
                &format!("$keter_rl_{escaped}_{n}"),
            )
            .replace(&format!("{encoded}_rl{n}"), &format!("keter_{escaped}_{n}"))
            .replace(&format!("{encoded}_{n}"), &format!("keter-{app}-{n}"));
    }
    text.replace(encoded, &format!("keter-{app}"))
}

#[test]
fn an_app_file_of_the_earlier_naming_loads_beside_new_ones() {
    let mut k = Keter::start_with(
        "names-upgrade",
        Opts {
            ports: 40,
            ..Opts::default()
        },
    );
    webapps(
        &k,
        "Shop",
        &[("Shop", "big-shop.example.com")],
        &throttle("X-Key", 100),
    );
    k.wait_for("big-shop.example.com", "Shop", WAIT);
    webapps(&k, "web-1", &[("web-1", "web-1.example.com")], "");
    k.wait_for("web-1.example.com", "web-1", WAIT);

    // Their files as an earlier keter wrote them, taken over by a keter started again: it
    // keeps each file until its app's next deploy.
    let _ = k.signal_and_wait(Signal::SIGKILL);
    let mut written = Vec::new();
    for (app, encoded) in [("Shop", "keter__ushop"), ("web-1", "keter_web_h1")] {
        let path = k.root.join(format!("nginx/apps/{app}.conf"));
        let text = earlier_names(&fs::read_to_string(&path).unwrap(), app, encoded);
        assert!(text.contains(&format!("upstream keter-{app} {{")), "{text}");
        fs::write(&path, &text).unwrap();
        written.push((path, text));
    }
    assert!(
        written[0].1.contains("$keter_rl_Shop_1"),
        "{}",
        written[0].1
    );
    k.launch();
    k.wait_log("keter: took over 2 apps", WAIT);

    // New apps whose names were those of the earlier files' objects, but for case or a
    // suffix: each deploys and serves, beside the earlier files.
    webapps(
        &k,
        "shop",
        &[("shop", "small-shop.example.com")],
        &throttle("X-Key", 100),
    );
    k.wait_for("small-shop.example.com", "shop", WAIT);
    webapps(
        &k,
        "web",
        &[
            ("web-a", "a.web.example.com"),
            ("web-b", "b.web.example.com"),
        ],
        "",
    );
    k.wait_for("a.web.example.com", "web-a", WAIT);
    k.wait_for("b.web.example.com", "web-b", WAIT);
    for (host, version) in [
        ("big-shop.example.com", "Shop"),
        ("web-1.example.com", "web-1"),
        ("small-shop.example.com", "shop"),
    ] {
        assert_eq!(k.get(host, "/").unwrap().body.trim(), version, "{host}");
    }
    // The keter that took them over wrote them again as it writes files now.
    for (path, text) in written {
        let now = fs::read_to_string(&path).unwrap();
        assert_ne!(now, text, "{} was not written again", path.display());
        assert!(!now.contains("upstream keter-"), "{now}");
    }
}

/// The Nginx generation keter's controller last wrote.
fn generation(k: &Keter) -> String {
    fs::read_to_string(k.root.join("nginx/generation.conf")).unwrap()
}

#[test]
fn a_keter_that_takes_over_writes_the_files_of_an_earlier_keter_again() {
    let mut k = Keter::start("files-upgrade");
    let yaml = "stanzas:\n  - type: webapp\n    exec: ../dist/hello\n    args: [--version-string, v1]\n    host: app.example.com\n  - type: static-files\n    root: ../static\n    hosts: [files.example.com]\n";
    let bundle = k.dir.0.join("app.keter");
    BundleBuilder::hello(yaml)
        .file("static/index.html", b"index\n".to_vec(), 0o644)
        .write(&bundle);
    k.deploy("app", &bundle);
    k.wait_for("app.example.com", "v1", WAIT);
    let conf = k.root.join("nginx/apps/app.conf");
    let written = fs::read_to_string(&conf).unwrap();
    assert!(
        written.contains("disable_symlinks if_not_owner"),
        "{written}"
    );

    // Taken over as it is: rendered again, the same file, and Nginx is not reloaded.
    let before = generation(&k);
    let _ = k.signal_and_wait(Signal::SIGKILL);
    k.launch();
    k.wait_log("app: site rendered again by this keter", WAIT);
    assert_eq!(generation(&k), before, "{}", k.log());
    assert_eq!(fs::read_to_string(&conf).unwrap(), written);

    // Taken over from a keter that wrote no symlink check (as keter did before it had one):
    // the file is written again with it, and a link the app plants then leads nowhere.
    let _ = k.signal_and_wait(Signal::SIGKILL);
    let earlier: String = written
        .lines()
        .filter(|l| !l.contains("disable_symlinks"))
        .map(|l| format!("{l}\n"))
        .collect();
    fs::write(&conf, &earlier).unwrap();
    k.launch();
    let start = Instant::now();
    while !fs::read_to_string(&conf)
        .unwrap()
        .contains("disable_symlinks if_not_owner")
    {
        assert!(start.elapsed() < WAIT, "never written again:\n{}", k.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_ne!(generation(&k), before);
    plant(
        &k,
        "app.example.com",
        Path::new("/etc/passwd"),
        "static/passwd",
    );
    wait_status(&k, "files.example.com", "/passwd", 404);
    assert_eq!(
        get_with(&k, "files.example.com", "/index.html", &[]).1,
        "index\n"
    );
}
