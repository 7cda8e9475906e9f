//! What Nginx does for Keter's keys, through a real Nginx: listeners in Warp's forms and TLS
//! session resumption, uploads without Nginx's 1 MiB limit, Keter's middlewares (a rate limit
//! answering 429, basic authentication, local-only, headers, autohead), the operator's response
//! pages, Keter's global keys that keter replaces, and the files Nginx's workers read.

use std::fs;
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use crate::keter_configs::{
    WAIT, app_bundle, check, curl, deployed, fixture, get_ok, raw_get, render, write, yaml_only,
};
use crate::stanzas::{curl_tls, header, self_signed};
use crate::status::keter_cmd;
use crate::support::*;

#[test]
fn warps_listener_forms() {
    let named = free_port();
    let k = Keter::start_with(
        "listener-forms",
        Opts {
            listeners: Some(format!(
                "[{{host: \"*6\", port: {{port}}}}, {{host: localhost, port: {named}}}, {{host: \"!6\", port: {named4}}}]",
                named4 = free_port()
            )),
            ..Opts::default()
        },
    );
    let (code, out, _) = keter_cmd(&["check", k.config_path.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    k.deploy_hello("forms", "forms", "forms.example.com", &[]);
    k.wait_for("forms.example.com", "forms", WAIT);
    // `*6` is every IPv6 and IPv4 address, as Warp's dual-stack socket.
    let v6 = SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, k.port));
    let r = keter::probe::get_tcp(v6, "forms.example.com", "/", Duration::from_secs(5)).unwrap();
    assert_eq!(r.body.trim(), "forms");
    // A host name: every address it resolves to.
    let v4 = SocketAddr::from(([127, 0, 0, 1], named));
    let r = keter::probe::get_tcp(v4, "forms.example.com", "/", Duration::from_secs(5)).unwrap();
    assert_eq!(r.body.trim(), "forms");
    let (_, conf) = render(
        &k,
        &write(
            &k,
            "r",
            &app_bundle("dist/hello", "exec: ../dist/hello\nhost: r.example.com\n"),
        ),
    );
    assert!(conf.contains(&format!("listen [::]:{};", k.port)), "{conf}");
    assert!(
        conf.contains(&format!("listen 127.0.0.1:{named};")),
        "{conf}"
    );
}

/// Also: the app learns the client's address and the scheme it used, over TLS and plain HTTP
/// alike (the templates write the scheme out per server block rather than `$scheme`).
#[test]
fn a_tls_listener_with_session_resumes_sessions() {
    require_nginx();
    let dir = TempDir::new("session-certs");
    let (cert, key) = self_signed(&dir.0, "tls.example.com");
    let tls_port = free_port();
    let k = Keter::start_with(
        "tls-session",
        Opts {
            extra: format!(
                "ssl: {{host: 127.0.0.1, port: {tls_port}, key: {}, certificate: {}, session: true}}\n",
                key.display(),
                cert.display()
            ),
            ..Opts::default()
        },
    );
    let (code, out, _) = keter_cmd(&["check", k.config_path.to_str().unwrap()]);
    assert_eq!((code, out.contains("warning")), (0, false), "{out}");
    k.deploy_hello("tls", "tls", "tls.example.com", &[]);
    k.wait_for("tls.example.com", "tls", WAIT);
    // A TLS 1.2 client without tickets resumes only from the server's session cache.
    let sess = dir.0.join("session.pem");
    let s_client = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(["s_client", "-connect"])
            .arg(format!("127.0.0.1:{tls_port}"))
            .args(["-servername", "tls.example.com", "-tls1_2", "-no_ticket"])
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("openssl is needed (apt-get install openssl)");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let first = s_client(&["-sess_out", sess.to_str().unwrap()]);
    assert!(first.contains("New, TLSv1.2"), "{first}");
    let again = s_client(&["-sess_in", sess.to_str().unwrap()]);
    assert!(again.contains("Reused, TLSv1.2"), "{again}");
    assert_eq!(curl_tls(tls_port, "tls.example.com", "/").2.trim(), "tls");
    assert_eq!(
        curl_tls(tls_port, "tls.example.com", "/forwarded").2.trim(),
        "x-forwarded-for: 127.0.0.1\nx-forwarded-proto: https\nx-real-ip: 127.0.0.1"
    );
    let plain = k.get("tls.example.com", "/forwarded").unwrap();
    assert_eq!(
        plain.body.trim(),
        "x-forwarded-for: 127.0.0.1\nx-forwarded-proto: http\nx-real-ip: 127.0.0.1"
    );
}

#[test]
fn uploads_through_nginx_are_not_cut_at_one_mib() {
    let k = Keter::start_with(
        "uploads",
        Opts {
            extra: "client-max-body-size: 8m\n".into(),
            ..Opts::default()
        },
    );
    let yaml = "stanzas:\n  - type: webapp\n    exec: ../dist/hello\n    hosts: [up.example.com]\n  - type: webapp\n    exec: ../dist/hello\n    hosts: [small.example.com]\n    client-max-body-size: 1m\n";
    let b = write(&k, "uploads", &app_bundle("dist/hello", yaml));
    deployed(&k, "uploads", &b).unwrap();
    let file = k.dir.0.join("upload.bin");
    fs::write(&file, vec![b'x'; 5 << 20]).unwrap();
    let data = format!("@{}", file.display());
    let (status, _, body) = curl(&k, "up.example.com", "/upload", &["--data-binary", &data]);
    assert_eq!((status, body.trim()), (200, "received 5242880"));
    let (status, _, _) = curl(
        &k,
        "small.example.com",
        "/upload",
        &["--data-binary", &data],
    );
    assert_eq!(status, 413);
    // Without the key there is no limit at all, as in Keter.
    let k = Keter::start("uploads-default");
    let b = write(
        &k,
        "up",
        &app_bundle("dist/hello", "exec: ../dist/hello\nhost: up.example.com\n"),
    );
    deployed(&k, "up", &b).unwrap();
    let big = k.dir.0.join("big.bin");
    fs::write(&big, vec![b'y'; 12 << 20]).unwrap();
    let data = format!("@{}", big.display());
    let (status, _, body) = curl(&k, "up.example.com", "/upload", &["--data-binary", &data]);
    assert_eq!((status, body.trim()), (200, "received 12582912"));
}

#[test]
fn a_rate_limit_answers_429_past_its_rate() {
    let k = Keter::start("rate-limit");
    let b = write(
        &k,
        "limited",
        &app_bundle("dist/hello", &fixture("keter-rate-limiter.yaml")),
    );
    let (code, out) = check(&k, &b);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("is kept by Nginx as 17r/m"), "{out}");
    let (_, conf) = render(&k, &b);
    assert!(conf.contains("rate=1r/m"), "{conf}");
    assert!(conf.contains("burst=9 nodelay"), "{conf}");
    deployed(&k, "limited", &b).unwrap();
    // Ten at once, as Keter's limit allows; then one every minute.
    for i in 0..10 {
        assert_eq!(curl(&k, "rl.test", "/", &[]).0, 200, "request {i}");
    }
    let (status, _, _) = curl(&k, "rl.test", "/", &[]);
    assert_eq!(status, 429);
    // Another client address has its own count.
    let (status, _, body) = curl(&k, "rl.test", "/", &["--interface", "127.0.0.2"]);
    assert_eq!((status, body.trim()), (200, "limited"));
}

#[test]
fn basic_auth_local_only_headers_and_autohead_as_nginx_does_them() {
    let k = Keter::start("middlewares");
    let yaml = "stanzas:\n  - type: webapp\n    exec: ../dist/hello\n    args: [--version-string, guarded]\n    hosts: [guarded.example.com]\n    middleware:\n      - basic-auth:\n          realm: \"Staff only\"\n          creds: {jon: rocks, ops: \"1234\"}\n      - headers:\n          X-Frame-Options: DENY\n          Access-Control-Allow-Origin: \"*\"\n      - autohead\n  - type: webapp\n    exec: ../dist/hello\n    args: [--version-string, inside]\n    hosts: [admin.example.com]\n    middleware:\n      - local: {status: 403, message: \"local requests only\"}\n";
    let b = write(&k, "guarded", &app_bundle("dist/hello", yaml));
    let (code, out) = check(&k, &b);
    assert_eq!(code, 0, "{out}");
    deployed(&k, "guarded", &b).unwrap();
    let (status, headers, _) = curl(&k, "guarded.example.com", "/", &[]);
    assert_eq!(status, 401);
    assert_eq!(
        header(&headers, "www-authenticate"),
        Some("basic realm=\"staff only\"")
    );
    assert_eq!(
        curl(&k, "guarded.example.com", "/", &["-u", "jon:wrong"]).0,
        401
    );
    let (status, headers, body) = curl(&k, "guarded.example.com", "/", &["-u", "jon:rocks"]);
    assert_eq!((status, body.trim()), (200, "guarded"));
    assert_eq!(header(&headers, "x-frame-options"), Some("deny"));
    assert_eq!(header(&headers, "access-control-allow-origin"), Some("*"));
    assert_eq!(
        curl(&k, "guarded.example.com", "/", &["-u", "ops:1234"]).0,
        200
    );
    // autohead: the app sees GET, the client gets the headers only; without it, HEAD.
    let (status, headers, body) = curl(&k, "guarded.example.com", "/", &["-u", "jon:rocks", "-I"]);
    assert_eq!((status, body.as_str()), (200, ""));
    assert_eq!(header(&headers, "x-request-method"), Some("get"));
    let (_, headers, _) = curl(&k, "admin.example.com", "/", &["-I"]);
    assert_eq!(header(&headers, "x-request-method"), Some("head"));
    // local: 127.0.0.1 gets in; another address (127.0.0.2 is not "local" to Keter) gets the
    // configured answer.
    assert_eq!(get_ok(&k, "admin.example.com", "/"), "inside");
    let (status, _, text) = curl(&k, "admin.example.com", "/", &["--interface", "127.0.0.2"]);
    assert_eq!((status, text.trim()), (403, "local requests only"));
    // The password file: in worker-files, not readable by others.
    let files = k.root.join("nginx/worker-files/apps/guarded");
    let entry = fs::read_dir(&files)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::metadata(&entry).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o640, "{}", entry.display());
    let text = fs::read_to_string(&entry).unwrap();
    assert!(
        text.starts_with("jon:{SSHA}") || text.contains("\njon:{SSHA}"),
        "{text}"
    );
    assert!(!text.contains("rocks"), "{text}");

    // What Nginx cannot do in front of an app is refused, naming the entry, never dropped.
    for (name, mw) in [
        ("jsonp", "jsonp"),
        ("accept-override", "accept-override"),
        ("method-override", "method-override"),
        ("method-override-post", "method-override-post"),
    ] {
        let yaml = format!(
            "stanzas:\n  - type: webapp\n    exec: ../dist/hello\n    hosts: [r.example.com]\n    middleware: [autohead, {mw}]\n"
        );
        let b = write(&k, "refused", &app_bundle("dist/hello", &yaml));
        let (code, out) = check(&k, &b);
        assert_eq!(code, 1, "{out}");
        assert!(
            out.contains(&format!(
                "stanzas[0].middleware[1]: Keter's {name} middleware"
            )),
            "{out}"
        );
        assert!(
            deployed(&k, "refused", &b)
                .unwrap_err()
                .contains("stanzas[0].middleware[1]")
        );
    }
}

#[test]
fn keters_sample_static_middlewares_and_time_bounds() {
    let k = Keter::start("static-mw");
    let sample = app_bundle("hello", &fixture("keter-sample-foo1_0.yaml")).file(
        "static/index.txt",
        b"sample files\n".to_vec(),
        0o644,
    );
    let sample = write(&k, "foo1_0", &sample);
    let (_, conf) = render(&k, &sample);
    assert!(conf.contains("send_timeout 30000ms;"), "{conf}");
    deployed(&k, "foo1_0", &sample).unwrap();
    assert_eq!(curl(&k, "unsafe2_1_0", "/index.txt", &[]).0, 401);
    let (status, headers, body) = curl(&k, "unsafe2_1_0", "/index.txt", &["-u", "bla:dada"]);
    assert_eq!((status, body.as_str()), (200, "sample files\n"));
    assert_eq!(header(&headers, "access-control-allow-origin"), Some("*"));
    // directory-listing: true.
    let listing = curl(&k, "unsafe2_1_0", "/", &["-u", "bla:dada"]).2;
    assert!(listing.contains("index.txt"), "{listing}");
    let (status, _, text) = curl(
        &k,
        "unsafe2_1_0",
        "/index.txt",
        &["--interface", "127.0.0.2"],
    );
    assert_eq!(
        (status, text.trim()),
        (405, "Keter Rocks (local status message)")
    );

    // A reverse proxy's Keter `timeout` is microseconds; `connection-time-bound` milliseconds.
    let yaml = "stanzas:\n  - type: reverse-proxy\n    reversed-host: 127.0.0.1\n    reversed-port: 9\n    reversed-ssl: false\n    reversing-host: proxy.example.com\n    timeout: 30000000\n    connection-time-bound: 20000\n";
    let proxy = write(&k, "proxy", &yaml_only(yaml));
    let (code, out) = check(&k, &proxy);
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("warning"), "{out}");
    let (_, conf) = render(&k, &proxy);
    assert!(conf.contains("proxy_read_timeout 20000ms;"), "{conf}");
    let seconds = write(&k, "seconds", &yaml_only(&yaml.replace("30000000", "30")));
    let (code, out) = check(&k, &seconds);
    assert_eq!(code, 1);
    assert!(
        out.contains("timeout: 30 is microseconds, as in Keter"),
        "{out}"
    );
}

#[test]
fn the_operators_response_files_are_served_with_keters_status_codes() {
    require_nginx();
    let dir = TempDir::new("response-files");
    let pages = dir.0.join("pages");
    fs::create_dir_all(&pages).unwrap();
    fs::write(pages.join("unknown.html"), "<h1>No such site here</h1>\n").unwrap();
    fs::write(pages.join("missing.html"), "<h1>Which site?</h1>\n").unwrap();
    fs::write(pages.join("proxy.html"), "<h1>Back soon</h1>\n").unwrap();
    // 0600: keter reads the operator's files; Nginx's workers read its copies.
    for f in ["unknown.html", "missing.html", "proxy.html"] {
        set_mode(&pages.join(f), 0o600);
    }
    let k = Keter::start_with(
        "response-files",
        Opts {
            extra: format!(
                "unknown-host-response-file: {p}/unknown.html\nmissing-host-response-file: {p}/missing.html\nproxy-exception-response-file: {p}/proxy.html\n",
                p = pages.display()
            ),
            ..Opts::default()
        },
    );
    let (code, out, _) = keter_cmd(&["check", k.config_path.to_str().unwrap()]);
    assert_eq!((code, out.contains("warning")), (0, false), "{out}");
    let (status, headers, body) = curl(&k, "nobody-here.example.com", "/x", &[]);
    assert_eq!(
        (status, body.as_str()),
        (404, "<h1>No such site here</h1>\n")
    );
    assert_eq!(
        header(&headers, "content-type"),
        Some("text/html; charset=utf-8")
    );
    let raw = raw_get(k.addr(), "GET / HTTP/1.1\r\n\r\n");
    assert!(raw.starts_with("HTTP/1.1 502"), "{raw}");
    assert!(raw.contains("<h1>Which site?</h1>"), "{raw}");
    // A reverse proxy to a port where nothing listens: the proxy-exception page, 502.
    let yaml = format!(
        "stanzas:\n  - type: reverse-proxy\n    reversed-host: 127.0.0.1\n    reversed-port: {}\n    reversed-ssl: false\n    reversing-host: down.example.com\n",
        free_port()
    );
    let b = write(&k, "down", &yaml_only(&yaml));
    deployed(&k, "down", &b).unwrap();
    let (status, _, body) = curl(&k, "down.example.com", "/", &[]);
    assert_eq!((status, body.as_str()), (502, "<h1>Back soon</h1>\n"));
}

#[test]
fn keter_only_global_keys_are_given_their_replacement() {
    let dir = TempDir::new("global-keys");
    let root = dir.0.join("root");
    let text = fixture("nixos-keter-config.yaml")
        .replace("@PORT@", &free_port().to_string())
        .replace("@ROOT@", root.to_str().unwrap());
    let config = dir.0.join("keter-config.yaml");
    fs::write(
        &config,
        format!("{}\n", text.trim_end().trim_end_matches('}').to_string()
            + ",\"app-crash-hook\":\"/usr/local/bin/notify\",\"graceful-drain-micros\":5000000,\"port-manager\":{}}"),
    )
    .unwrap();
    let (code, out, _) = keter_cmd(&["check", config.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("unknown key"), "{out}");
    for expected in [
        "cli-port: Keter's debug console is not there: `keter status` and the status web interface",
        "app-crash-hook: Keter runs no crash hook",
        "port-manager: Keter ignores the contents of this key",
    ] {
        assert!(out.contains(expected), "{expected} missing in {out}");
    }
    // graceful-drain-micros is drain-time; both at once is an error.
    fs::write(
        &config,
        format!(
            "root: {}\ngraceful-drain-micros: 5000000\ndrain-time: 3\n",
            root.display()
        ),
    )
    .unwrap();
    let (code, out, _) = keter_cmd(&["check", config.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        out.contains("both drain-time and Keter's graceful-drain-micros"),
        "{out}"
    );
    // Keter's global reverse-proxy list is refused rather than ignored.
    fs::write(&config, format!("root: {}\nreverse-proxy:\n  - {{reversed-host: 127.0.0.1, reversed-port: 9000, reversing-host: api.example.com, reversed-ssl: false}}\n", root.display())).unwrap();
    let (code, out, _) = keter_cmd(&["check", config.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        out.contains("reverse-proxy: Keter's global reverse-proxy list is not supported"),
        "{out}"
    );
}

#[test]
fn worker_files_are_readable_by_www_data_workers_and_not_by_apps() {
    // Workers as Debian's Nginx runs them (user www-data), apps as another user.
    let k = Keter::start_with(
        "worker-files",
        Opts {
            extra: "setuid: nobody\n".into(),
            ..Opts::default()
        },
    );
    let yaml = "stanzas:\n  - type: webapp\n    exec: ../dist/hello\n    args: [--version-string, private]\n    hosts: [private.example.com]\n    middleware:\n      - basic-auth: {creds: {jon: rocks}}\n";
    let b = write(&k, "private", &app_bundle("dist/hello", yaml));
    deployed(&k, "private", &b).unwrap();
    // The managed Nginx's workers run as www-data; the file is theirs to read...
    let (status, _, body) = curl(&k, "private.example.com", "/", &["-u", "jon:rocks"]);
    assert_eq!((status, body.trim()), (200, "private"));
    // ...and not the app's, which runs as nobody.
    let file = fs::read_dir(k.root.join("nginx/worker-files/apps/private"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    use std::os::unix::fs::MetadataExt;
    let meta = fs::metadata(&file).unwrap();
    let www = nix::unistd::Group::from_name("www-data").unwrap().unwrap();
    assert_eq!((meta.uid(), meta.gid()), (0, www.gid.as_raw()));
    let path = format!("/read?path={}", file.display());
    let answer = curl(&k, "private.example.com", &path, &["-u", "jon:rocks"]).2;
    assert!(answer.contains("Permission denied"), "{answer}");
}
