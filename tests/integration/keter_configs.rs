//! Real Keter configurations deploy unchanged: bundles and global configurations written the
//! way Yesod's scaffolds of several ages, Keter's own README and samples and NixOS's module
//! write them, each through `keter check`, `keter render` and a real deploy behind Nginx.

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::stanzas::{curl_tls, header, request, self_signed};
use crate::status::keter_cmd;
use crate::support::*;

pub const WAIT: Duration = Duration::from_secs(20);

pub fn fixture(name: &str) -> String {
    fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name),
    )
    .unwrap()
}

/// A bundle with the example app at `exec_path` and `yaml` as `config/keter.yaml`.
pub fn app_bundle(exec_path: &str, yaml: &str) -> BundleBuilder {
    BundleBuilder::new()
        .file(exec_path, fs::read(hello_binary()).unwrap(), 0o755)
        .file("config/keter.yaml", yaml.as_bytes().to_vec(), 0o644)
}

pub fn yaml_only(yaml: &str) -> BundleBuilder {
    BundleBuilder::new().file("config/keter.yaml", yaml.as_bytes().to_vec(), 0o644)
}

/// Writes `b` as `NAME.keter` in the test's folder (not in `incoming/`).
pub fn write(k: &Keter, name: &str, b: &BundleBuilder) -> PathBuf {
    let dir = k.dir.0.join("bundles");
    fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{name}.keter"));
    b.write(&path);
    path
}

/// `keter check BUNDLE -c CONFIG` against the daemon's configuration: exit code and output.
pub fn check(k: &Keter, bundle: &Path) -> (i32, String) {
    let (code, out, err) = keter_cmd(&[
        "check",
        bundle.to_str().unwrap(),
        "-c",
        k.config_path.to_str().unwrap(),
    ]);
    (code, format!("{out}{err}"))
}

/// `keter render BUNDLE -c CONFIG`: exit code and the file (or the errors).
pub fn render(k: &Keter, bundle: &Path) -> (i32, String) {
    let (code, out, err) = keter_cmd(&[
        "render",
        bundle.to_str().unwrap(),
        "-c",
        k.config_path.to_str().unwrap(),
    ]);
    (code, format!("{out}{err}"))
}

/// Deploys the bundle file at `path` as `name` and waits for the deploy's end: `Ok` when it
/// switched, the log line when it failed.
pub fn deployed(k: &Keter, name: &str, path: &Path) -> Result<(), String> {
    let failed = format!("{name}: deploy of {name}.keter failed");
    let before = k.last_deploy(name);
    k.deploy(name, path);
    let status = k.wait_app(name, "ending its deploy", WAIT, |s| {
        s.last_deploy.as_ref().is_some_and(|d| {
            Some(d) != before.as_ref()
                && matches!(d.result, DeployResult::Succeeded | DeployResult::Failed)
        })
    });
    if status.last_deploy.unwrap().result == DeployResult::Succeeded {
        return Ok(());
    }
    let log = k.log();
    let line = log
        .lines()
        .rfind(|l| l.contains(&failed))
        .unwrap_or_default();
    Err(line.to_string())
}

/// curl against the front end with `Host: host`: status, lower-cased headers, body.
pub fn curl(k: &Keter, host: &str, path: &str, extra: &[&str]) -> (u16, Vec<String>, String) {
    let out = Command::new("curl")
        .args(["-s", "-i", "--max-time", "20", "-H"])
        .arg(format!("Host: {host}"))
        .args(extra)
        .arg(format!("http://127.0.0.1:{}{path}", k.port))
        .output()
        .expect("curl is needed (apt-get install curl)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    // Skip a `100 Continue` before the answer to an upload.
    let text = text
        .strip_prefix("HTTP/1.1 100 Continue\r\n\r\n")
        .unwrap_or(&text)
        .to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (
        status,
        lines.map(|l| l.to_ascii_lowercase()).collect(),
        body.to_string(),
    )
}

/// The body of `GET path` on `host`, trimmed, after checking it answered 200.
pub fn get_ok(k: &Keter, host: &str, path: &str) -> String {
    let (status, _, body) = curl(k, host, path, &[]);
    assert_eq!(status, 200, "{host}{path}: {body}\n{}", k.log());
    body.trim().to_string()
}

#[test]
fn yesod_scaffolds_of_several_ages_deploy_with_their_own_keys() {
    let k = Keter::start("scaffold-ages");
    // 2013: the flat format with `yesod keter`'s copy-to keys and a host in capitals.
    let old = write(
        &k,
        "oldsite",
        &app_bundle(
            "dist/build/oldsite/oldsite",
            &fixture("yesod-scaffold-2013-flat.yaml"),
        ),
    );
    let (code, out) = check(&k, &old);
    assert_eq!(code, 0, "{out}");
    assert!(
        !out.contains("warning"),
        "yesod keter's keys are not unknown: {out}"
    );
    // 2018: stanzas beside a leftover top-level `exec` and `extraFiles`; APPROOT set by the
    // bundle; port-env-vars naming YESOD_PORT as Keter's README shows.
    let blog = app_bundle("dist/bin/blog", &fixture("yesod-scaffold-2018.yml")).file(
        "static/css/blog.css",
        b"h1 { color: navy }\n".to_vec(),
        0o644,
    );
    let blog = write(&k, "blog", &blog);
    let (code, out) = check(&k, &blog);
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("warning"), "{out}");

    deployed(&k, "oldsite", &old).unwrap();
    deployed(&k, "blog", &blog).unwrap();
    assert_eq!(get_ok(&k, "www.oldsite.example.com", "/"), "oldsite");
    assert_eq!(get_ok(&k, "OLDSITE.example.com", "/"), "oldsite");
    let env = get_ok(&k, "blog.example.com", "/env");
    let port = env
        .lines()
        .find_map(|l| l.strip_prefix("PORT="))
        .unwrap()
        .to_string();
    assert!(env.contains(&format!("YESOD_PORT={port}")), "{env}");
    // The bundle's APPROOT wins, as in Keter, and YESOD_APPROOT follows it.
    let lines: Vec<&str> = env.lines().collect();
    assert!(lines.contains(&"APPROOT=https://blog.example.com"), "{env}");
    assert!(
        lines.contains(&"YESOD_APPROOT=https://blog.example.com"),
        "{env}"
    );
    assert_eq!(
        k.log_count("APPROOT is https://blog.example.com as the configuration sets it"),
        1,
        "{}",
        k.log()
    );
    assert_eq!(
        get_ok(&k, "static.blog.example.com", "/css/blog.css"),
        "h1 { color: navy }"
    );
    // Redirect targets keep the case they are written in, as Keter's do.
    let (status, headers, _) = request(k.addr(), "www.blog.example.com", "/post/1?x=y");
    assert_eq!(
        (status, header(&headers, "location")),
        (303, Some("http://blog.example.com/post/1?x=y"))
    );
    let raw = raw_get(
        k.addr(),
        "GET /p HTTP/1.1\r\nHost: www.blog.example.com\r\n\r\n",
    );
    assert!(
        raw.contains("Location: http://Blog.Example.com/p\r\n"),
        "{raw}"
    );
}

/// One HTTP request written as given; the whole answer as text.
pub fn raw_get(addr: SocketAddr, request: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 65536];
    while let Ok(n) = s.read(&mut chunk) {
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.windows(4).any(|w| w == b"\r\n\r\n") && !request.contains("Connection: keep") {
            // Answers here are short; one read past the headers is enough.
            if let Ok(n) = s.read(&mut chunk) {
                buf.extend_from_slice(&chunk[..n]);
            }
            break;
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

#[test]
fn port_and_approot_in_a_bundle_env() {
    let k = Keter::start("env-keys");
    // PORT stays keter's: its readiness check connects there.
    let b = write(
        &k,
        "ported",
        &app_bundle(
            "dist/hello",
            "stanzas:\n  - type: webapp\n    exec: ../dist/hello\n    hosts: [p.example.com]\n    env: {PORT: \"3000\"}\n",
        ),
    );
    let (code, out) = check(&k, &b);
    assert_eq!(code, 1, "{out}");
    let message = "stanzas[0].env.PORT: PORT is set by keter to the port it gives the app";
    assert!(out.contains(message), "{out}");
    assert!(deployed(&k, "ported", &b).unwrap_err().contains(message));
    // YESOD_PORT in port-env-vars is what keter sets anyway; APPROOT in a flat env too.
    let b = write(
        &k,
        "flat",
        &app_bundle(
            "dist/hello",
            "exec: ../dist/hello\nargs: [--version-string, flat]\nhost: flat.example.com\nenv:\n  APPROOT: http://flat.example.com:8080\n  YESOD_APPROOT: http://yesod.flat.example.com\n",
        ),
    );
    assert_eq!(check(&k, &b).0, 0);
    deployed(&k, "flat", &b).unwrap();
    let env = get_ok(&k, "flat.example.com", "/env");
    let lines: Vec<&str> = env.lines().collect();
    assert!(
        lines.contains(&"APPROOT=http://flat.example.com:8080"),
        "{env}"
    );
    assert!(
        lines.contains(&"YESOD_APPROOT=http://yesod.flat.example.com"),
        "{env}"
    );
}

#[test]
fn hosts_with_a_port_route_as_keter_matches_the_host_header() {
    let k = Keter::start("host-ports");
    let yaml = format!(
        "exec: ../dist/hello\nargs: [--version-string, ported]\nhost: ported.example.com\nextra-hosts:\n  - \"127.0.0.1:{p}\"\n  - \"localhost:8000\"\n",
        p = k.port
    );
    let b = write(&k, "ported", &app_bundle("dist/hello", &yaml));
    let (code, out) = check(&k, &b);
    assert_eq!(code, 0, "{out}");
    let (code, conf) = render(&k, &b);
    assert_eq!(code, 0, "{conf}");
    assert!(conf.contains("server_name 127.0.0.1 localhost;"), "{conf}");
    deployed(&k, "ported", &b).unwrap();
    // Keter matches the whole Host header first, then the header without its port.
    assert_eq!(get_ok(&k, &format!("127.0.0.1:{}", k.port), "/"), "ported");
    assert_eq!(get_ok(&k, "LOCALHOST:8000", "/"), "ported");
    assert_eq!(get_ok(&k, "ported.example.com:9999", "/"), "ported");
    for other in ["localhost:9000", "localhost", "127.0.0.1"] {
        assert_eq!(curl(&k, other, "/", &[]).0, 404, "{other}");
    }
    // The readiness check and APPROOT use the first host; a host with a port keeps its own.
    let yaml = "stanzas:\n  - type: webapp\n    exec: ../dist/hello\n    args: [--version-string, first]\n    hosts: [\"first.localhost:8001\"]\n";
    let b = write(&k, "first", &app_bundle("dist/hello", yaml));
    deployed(&k, "first", &b).unwrap();
    let env = get_ok(&k, "first.localhost:8001", "/env");
    assert!(
        env.lines()
            .any(|l| l == "APPROOT=http://first.localhost:8001"),
        "{env}"
    );
    // Another app cannot take the same name with another port: Nginx routes by the name.
    let b = write(
        &k,
        "clash",
        &app_bundle(
            "dist/hello",
            "exec: ../dist/hello\nhost: \"localhost:8002\"\n",
        ),
    );
    let e = deployed(&k, "clash", &b).unwrap_err();
    assert!(
        e.contains("the host localhost is already served by the app"),
        "{e}"
    );
}

#[test]
fn keters_own_sample_with_underscores_absolute_exec_and_a_shared_host() {
    let k = Keter::start("keter-sample");
    let sample = app_bundle("hello", &fixture("keter-sample-foo1_0.yaml")).file(
        "static/index.txt",
        b"sample files\n".to_vec(),
        0o644,
    );
    let sample = write(&k, "foo1_0", &sample);
    let (code, out) = check(&k, &sample);
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("unknown key"), "{out}");
    deployed(&k, "foo1_0", &sample).unwrap();
    assert_eq!(get_ok(&k, "keter1_0", "/"), "Hello World v1.0");
    assert_eq!(get_ok(&k, "pong1_0", "/"), "Hello World v1.0");
    // Nginx's catch-all name is still refused.
    let b = write(
        &k,
        "catchall",
        &app_bundle("dist/hello", "exec: ../dist/hello\nhost: _\n"),
    );
    let (code, out) = check(&k, &b);
    assert_eq!(code, 1);
    assert!(
        out.contains("host: the host name \"_\" is Nginx's catch-all name"),
        "{out}"
    );

    // NixOS's module: JSON written by toYAML, an absolute exec into the store.
    let store = k.dir.0.join("nix/store/abc123-bundle-wrapper/bin");
    fs::create_dir_all(&store).unwrap();
    let exec = store.join("bundle-wrapper");
    fs::copy(hello_binary(), &exec).unwrap();
    let yaml = fixture("nixos-bundle.yaml").replace("@EXEC@", exec.to_str().unwrap());
    let nixos = write(&k, "nixos", &yaml_only(&yaml));
    let (code, out) = check(&k, &nixos);
    assert_eq!(code, 0, "{out}");
    deployed(&k, "nixos", &nixos).unwrap();
    assert_eq!(get_ok(&k, "nixos.example.com", "/"), "hello");
    let missing = write(
        &k,
        "nixos2",
        &yaml_only(&yaml.replace("bundle-wrapper\"", "missing\"")),
    );
    let (code, out) = check(&k, &missing);
    assert_eq!(code, 1);
    assert!(out.contains("does not exist on this host"), "{out}");
    // `keter bundle` packs on a build machine: what only the host has is left to the host.
    let folder = k.dir.0.join("nixos-folder");
    fs::create_dir_all(folder.join("config")).unwrap();
    fs::write(
        folder.join("config/keter.yaml"),
        yaml.replace("bundle-wrapper\"", "missing\""),
    )
    .unwrap();
    let packed = k.dir.0.join("nixos3.keter");
    let (code, out, err) = keter_cmd(&[
        "bundle",
        folder.to_str().unwrap(),
        "-o",
        packed.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("is a path on the host; it is checked when the bundle is deployed"),
        "{out}"
    );
    assert_eq!(check(&k, &packed).0, 1);

    // One host in two stanzas: Keter serves it from the first; keter warns, naming both.
    let yaml = "stanzas:\n  - type: webapp\n    exec: ../dist/hello\n    args: [--version-string, app]\n    hosts: [shared.example.com, app.example.com]\n  - type: static-files\n    hosts: [shared.example.com, files.example.com]\n    root: ../static\n";
    let shared = write(
        &k,
        "shared",
        &app_bundle("dist/hello", yaml).file("static/f.txt", b"file\n".to_vec(), 0o644),
    );
    let (code, out) = check(&k, &shared);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("stanzas[1].hosts: the host shared.example.com is also listed by stanzas[0]; as in Keter, stanzas[0] serves it"),
        "{out}"
    );
    deployed(&k, "shared", &shared).unwrap();
    assert_eq!(get_ok(&k, "shared.example.com", "/"), "app");
    assert_eq!(get_ok(&k, "files.example.com", "/f.txt"), "file");
}

#[test]
fn absolute_certificate_paths_and_static_roots_get_one_verdict_from_check_and_deploy() {
    require_nginx();
    let dir = TempDir::new("verdicts");
    let shared = dir.0.join("srv/shared");
    fs::create_dir_all(shared.join("site")).unwrap();
    fs::write(shared.join("site/index.html"), "shared site\n").unwrap();
    let elsewhere = dir.0.join("srv/elsewhere");
    fs::create_dir_all(&elsewhere).unwrap();
    let tls_port = free_port();
    let (cert, key) = self_signed(&dir.0.join("live/tls.example.com"), "tls.example.com");
    let (other_cert, _) = self_signed(&dir.0.join("live/other.example.com"), "other.example.com");
    let k = Keter::start_with(
        "verdicts",
        Opts {
            extra: format!(
                "allowed-static-roots: [{}]\nssl: {{host: 127.0.0.1, port: {tls_port}, key: {}, certificate: {}}}\n",
                shared.display(),
                key.display(),
                cert.display()
            ),
            ..Opts::default()
        },
    );
    let ssl = |k: &Path, c: &Path| {
        format!(
            "stanzas:\n  - type: webapp\n    exec: ../dist/hello\n    args: [--version-string, own]\n    hosts: [tls.example.com]\n    ssl:\n      key: {}\n      certificate: {}\n      chain-certificates: []\n",
            k.display(),
            c.display()
        )
    };
    let statics = |root: &str| {
        format!(
            "stanzas:\n  - type: static-files\n    hosts: [static.example.com]\n    root: {root}\n"
        )
    };
    let cases: Vec<(&str, BundleBuilder, Option<&str>)> = vec![
        ("certok", app_bundle("dist/hello", &ssl(&key, &cert)), None),
        (
            "certmismatch",
            app_bundle("dist/hello", &ssl(&key, &other_cert)),
            Some("is not the key of"),
        ),
        (
            "certmissing",
            app_bundle("dist/hello", &ssl(&dir.0.join("nothing.key"), &cert)),
            Some("ssl.key: "),
        ),
        (
            "staticok",
            yaml_only(&statics(&shared.join("site").display().to_string())),
            None,
        ),
        (
            "staticout",
            yaml_only(&statics(&elsewhere.display().to_string())),
            Some("outside the bundle; the global allowed-static-roots lists only"),
        ),
        (
            "staticup",
            yaml_only(&statics("../../../../..")),
            Some("allowed-static-roots"),
        ),
    ];
    for (name, b, error) in cases {
        let path = write(&k, name, &b);
        let (code, out) = check(&k, &path);
        let verdict = deployed(&k, name, &path);
        match error {
            None => {
                assert_eq!(code, 0, "{name}: {out}");
                verdict.unwrap_or_else(|e| panic!("{name}: check said OK, the deploy {e}"));
            }
            Some(message) => {
                assert_eq!(code, 1, "{name}: {out}");
                assert!(out.contains(message), "{name}: {out}");
                let e = verdict.expect_err(name);
                assert!(e.contains(message), "{name}: check: {out}\ndeploy: {e}");
            }
        }
        if name == "certok" {
            let (_, subject, body) = curl_tls(tls_port, "tls.example.com", "/");
            assert_eq!(body.trim(), "own");
            assert!(subject.contains("CN=tls.example.com"), "{subject}");
        }
        if name == "staticok" {
            assert_eq!(
                get_ok(&k, "static.example.com", "/index.html"),
                "shared site"
            );
        }
    }
}

#[test]
fn a_number_where_host_names_belong_is_refused() {
    let k = Keter::start("host-number");
    for (yaml, key) in [
        (
            "stanzas:\n  - type: webapp\n    exec: ../dist/hello\n    hosts: 12\n",
            "stanzas[0].hosts",
        ),
        (
            "stanzas:\n  - type: static-files\n    root: ../dist\n    hosts: [ok.example.com, 12]\n",
            "stanzas[0].hosts[1]",
        ),
        ("exec: ../dist/hello\nhost: 12\n", "host"),
    ] {
        let b = write(&k, "numbers", &app_bundle("dist/hello", yaml));
        let (code, out) = check(&k, &b);
        assert_eq!(code, 1, "{out}");
        let message = format!("{key}: expected a host name (a string");
        assert!(out.contains(&message), "{out}");
        assert!(deployed(&k, "numbers", &b).unwrap_err().contains(&message));
    }
    // Quoted, it is a name (a one-label host), as in Keter.
    let b = write(
        &k,
        "quoted",
        &app_bundle(
            "dist/hello",
            "exec: ../dist/hello\nargs: [--version-string, twelve]\nhost: \"12\"\n",
        ),
    );
    deployed(&k, "quoted", &b).unwrap();
    assert_eq!(get_ok(&k, "12", "/"), "twelve");
}

#[test]
fn a_flat_bundle_of_redirects_and_listed_static_hosts() {
    let k = Keter::start("flat-static");
    let yaml = "# Only static hosts and redirects, as Keter 0.3.5 allows.\nstatic-hosts:\n  - host: docs.example.com\n    root: ../public\nredirects:\n  - from: example.com\n    to: WWW.Example.com\n";
    let b = yaml_only(yaml)
        .file("public/guide/a.html", b"<p>a</p>\n".to_vec(), 0o644)
        .file("public/guide/b.html", b"<p>b</p>\n".to_vec(), 0o644);
    let b = write(&k, "site", &b);
    let (code, out) = check(&k, &b);
    assert_eq!(code, 0, "{out}");
    deployed(&k, "site", &b).unwrap();
    // Keter lists directories of flat static hosts.
    let listing = get_ok(&k, "docs.example.com", "/guide/");
    assert!(
        listing.contains("a.html") && listing.contains("b.html"),
        "{listing}"
    );
    let raw = raw_get(
        k.addr(),
        "GET /about?x=1 HTTP/1.1\r\nHost: example.com\r\n\r\n",
    );
    assert!(raw.starts_with("HTTP/1.1 301"), "{raw}");
    assert!(
        raw.contains("Location: http://WWW.Example.com/about?x=1\r\n"),
        "{raw}"
    );
}
