//! What the Nginx files keter writes let through (README, "Generated Nginx files"): Nginx
//! object names of apps whose names are alike, with an app file written by an earlier keter
//! beside new ones.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

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

/// Waits until `GET path` on `host` answers `status`.
fn wait_status(k: &Keter, host: &str, path: &str, status: u16) {
    let start = Instant::now();
    while get_with(k, host, path, &[]).0 != status {
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
    // The earlier files were loaded with the new ones by the last reload, and still serve.
    for (path, text) in written {
        assert_eq!(
            fs::read_to_string(&path).unwrap(),
            text,
            "{} was rewritten",
            path.display()
        );
    }
}
