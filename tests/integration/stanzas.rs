//! Every Keter bundle deploys: the stanza types Nginx serves itself, many hosts and
//! wildcards, TLS listeners and certificates, ACME challenges and websockets, through a real
//! Nginx; plus the golden files under `tests/golden/` checked with `nginx -t`.

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::support::*;

const WAIT: Duration = Duration::from_secs(20);

/// A plain HTTP/1.0 request: status, lower-cased header lines and body.
pub fn request(addr: SocketAddr, host: &str, path: &str) -> (u16, Vec<String>, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers = lines.map(|l| l.to_ascii_lowercase()).collect();
    (status, headers, body.to_string())
}

pub fn header<'a>(headers: &'a [String], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find_map(|h| h.strip_prefix(&format!("{name}: ")))
}

/// A bundle with the example app at `exec_path` and `yaml` as `config/keter.yaml`.
fn bundle(exec_path: &str, yaml: &str) -> BundleBuilder {
    BundleBuilder::new()
        .file(exec_path, fs::read(hello_binary()).unwrap(), 0o755)
        .file("config/keter.yaml", yaml.as_bytes().to_vec(), 0o644)
}

fn deploy(k: &Keter, name: &str, b: BundleBuilder) {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = k.dir.0.join(format!("{name}-{n}.keter"));
    b.write(&path);
    k.deploy(name, &path);
}

/// A self-signed certificate for `cn` made with openssl: (certificate, key).
pub fn self_signed(dir: &Path, cn: &str) -> (PathBuf, PathBuf) {
    fs::create_dir_all(dir).unwrap();
    let cert = dir.join(format!("{cn}.crt"));
    let key = dir.join(format!("{cn}.key"));
    let status = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
        ])
        .arg(format!("/CN={cn}"))
        .arg("-addext")
        .arg(format!("subjectAltName=DNS:{cn}"))
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl is needed to make test certificates (apt-get install openssl)");
    assert!(status.success());
    (cert, key)
}

/// curl over TLS to 127.0.0.1 with `host` resolved there: (http version, subject, body).
pub fn curl_tls(port: u16, host: &str, path: &str) -> (String, String, String) {
    let out = Command::new("curl")
        .args(["-sk", "--http2", "-v", "--max-time", "5", "--resolve"])
        .arg(format!("{host}:{port}:127.0.0.1"))
        .arg("-w")
        .arg("\n%{http_version}")
        .arg(format!("https://{host}:{port}{path}"))
        .output()
        .expect("curl is needed for the TLS tests (apt-get install curl)");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let (body, version) = stdout.rsplit_once('\n').unwrap_or((&stdout, ""));
    let subject = stderr
        .lines()
        .find_map(|l| l.trim().strip_prefix("*  subject: "))
        .unwrap_or("")
        .to_string();
    (version.to_string(), subject, body.to_string())
}

#[test]
fn golden_files_pass_nginx_t() {
    require_nginx();
    let dir = TempDir::new("golden");
    let root = dir.0.join("srv");
    let (cert, key) = self_signed(&root.join("tls"), "golden.example.com");
    fs::rename(&cert, root.join("tls/cert.pem")).unwrap();
    fs::rename(&key, root.join("tls/key.pem")).unwrap();
    let own = root.join("etc/certs/demo-3");
    let (cert, key) = self_signed(&own, "own-cert.example.com");
    fs::rename(cert, own.join("certificate.pem")).unwrap();
    fs::rename(key, own.join("key.pem")).unwrap();
    // An ACME certificate: key and chain in one file, as keter's ACME client stores it.
    let acme = root.join("etc/acme/certs");
    let (cert, key) = self_signed(&acme, "shop.example.com");
    let both = format!(
        "{}{}",
        fs::read_to_string(&key).unwrap(),
        fs::read_to_string(&cert).unwrap()
    );
    fs::write(acme.join("shop.example.com-1a2b3c4d.pem"), both).unwrap();
    let prefix = root.join("nginx");
    fs::create_dir_all(prefix.join("temp")).unwrap();
    // The request log's folder, which keter makes before Nginx tests a file naming the log.
    fs::create_dir_all(prefix.join("worker-files")).unwrap();
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let map = "map $http_upgrade $keter_connection_upgrade { default upgrade; '' ''; }\nmap $request_method $keter_autohead_method { HEAD GET; default $request_method; }\n";
    let mut checked = 0;
    for entry in fs::read_dir(&golden).unwrap() {
        let path = entry.unwrap().path();
        let text = fs::read_to_string(&path)
            .unwrap()
            .replace("/srv/keter", &root.display().to_string());
        let main = if path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("main-")
        {
            fs::write(prefix.join("http.conf"), map).unwrap();
            text
        } else {
            let app = prefix.join("app.conf");
            fs::write(&app, text).unwrap();
            format!(
                "pid {p}/nginx.pid;\nerror_log stderr;\nevents {{}}\nhttp {{\n client_body_temp_path {p}/temp/b; proxy_temp_path {p}/temp/p; fastcgi_temp_path {p}/temp/f; uwsgi_temp_path {p}/temp/u; scgi_temp_path {p}/temp/s;\n server_names_hash_bucket_size 512;\n {map} include {};\n}}\n",
                app.display(),
                p = prefix.display()
            )
        };
        let main_path = prefix.join("nginx.conf");
        fs::write(&main_path, main).unwrap();
        let out = Command::new("nginx")
            .args(["-t", "-q", "-e", "stderr", "-p"])
            .arg(&prefix)
            .arg("-c")
            .arg(&main_path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        checked += 1;
    }
    assert!(checked >= 13, "only {checked} golden files");
}

#[test]
fn yesod_scaffold_bundle_serves_app_static_files_and_redirect() {
    let k = Keter::start("scaffold");
    let yaml = fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/yesod-scaffold.yml"),
    )
    .unwrap();
    let b = BundleBuilder::new()
        .file(
            "dist/bin/scaffold",
            fs::read(hello_binary()).unwrap(),
            0o755,
        )
        .file("config/keter.yml", yaml.into_bytes(), 0o644)
        .file(
            "static/css/site.css",
            b"body { color: teal }\n".to_vec(),
            0o644,
        )
        .file("static/secret-dir/x.txt", b"x\n".to_vec(), 0o644);
    deploy(&k, "scaffold", b);
    k.wait_for("www.scaffold.example.com", "scaffold", WAIT);

    let (status, headers, body) = request(k.addr(), "static.scaffold.example.com", "/css/site.css");
    assert_eq!((status, body.as_str()), (200, "body { color: teal }\n"));
    assert!(
        header(&headers, "cache-control").is_some_and(|c| c.contains("max-age=3600")),
        "{headers:?}"
    );
    // No directory listing unless asked for, and nothing outside the root.
    assert_eq!(
        request(k.addr(), "static.scaffold.example.com", "/secret-dir/").0,
        403
    );
    for path in [
        "/../config/keter.yml",
        "/%2e%2e/config/keter.yml",
        "/../../../../etc/passwd",
    ] {
        let (status, _, body) = request(k.addr(), "static.scaffold.example.com", path);
        assert!(status == 400 || status == 404, "{path}: {status} {body}");
        assert!(
            !body.contains("stanzas") && !body.contains("root:"),
            "{path}: {body}"
        );
    }
    // The redirect stanza: Keter's default status 303, same path on the www host.
    let (status, headers, _) = request(k.addr(), "scaffold.example.com", "/blog?page=2");
    assert_eq!(status, 303);
    assert_eq!(
        header(&headers, "location"),
        Some("http://www.scaffold.example.com/blog?page=2")
    );
}

#[test]
fn keters_documented_bundles_deploy_unchanged() {
    let k = Keter::start("docs-bundles");
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let flat = fs::read_to_string(fixtures.join("keter-readme-flat.yaml")).unwrap();
    deploy(
        &k,
        "yesodweb",
        bundle("dist/build/yesodweb/yesodweb", &flat),
    );
    let docs = fs::read_to_string(fixtures.join("keter-docs-stanzas.yaml")).unwrap();
    let b =
        bundle("dist/bin/myapp", &docs).file("static/readme.txt", b"hello files\n".to_vec(), 0o644);
    deploy(&k, "myapp", b);
    k.wait_for("www.yesodweb.example.com", "yesodweb", WAIT);
    k.wait_for("myapp.example.com", "docs-app", WAIT);
    k.wait_for("www.myapp.example.com", "docs-app", WAIT);
    let (status, _, body) = request(k.addr(), "files.myapp.example.com", "/");
    assert_eq!(status, 200);
    assert!(
        body.contains("readme.txt"),
        "directory listing expected: {body}"
    );
    let (status, headers, _) = request(k.addr(), "old.myapp.example.com", "/x");
    assert_eq!(
        (status, header(&headers, "location")),
        (301, Some("http://myapp.example.com/x"))
    );
    assert!(k.log().contains("(background stanza 0)"), "{}", k.log());
}

#[test]
fn redirect_forms_and_statuses() {
    let k = Keter::start("redirects");
    let yaml = "stanzas:\n  - type: redirect\n    hosts: [r.example.com]\n    status: 301\n    actions:\n      - {path: /docs, url: \"https://docs.example.com/start\"}\n      - {host: www.example.com, secure: true, port: 8443}\n  - type: redirect\n    hosts: [only-path.example.com]\n    status: 307\n    actions:\n      - {path: /a, host: a.example.com}\n";
    deploy(
        &k,
        "redir",
        BundleBuilder::new().file("config/keter.yaml", yaml.as_bytes().to_vec(), 0o644),
    );
    k.wait_serving("redir", WAIT);
    let (s, h, _) = request(k.addr(), "r.example.com", "/docs");
    assert_eq!(
        (s, header(&h, "location")),
        (301, Some("https://docs.example.com/start"))
    );
    let (s, h, _) = request(k.addr(), "r.example.com", "/x?y=1");
    assert_eq!(
        (s, header(&h, "location")),
        (301, Some("https://www.example.com:8443/x?y=1"))
    );
    let (s, h, _) = request(k.addr(), "only-path.example.com", "/a");
    assert_eq!(
        (s, header(&h, "location")),
        (307, Some("http://a.example.com/a"))
    );
    assert_eq!(request(k.addr(), "only-path.example.com", "/b").0, 404);
}

#[test]
fn reverse_proxy_to_a_second_local_server() {
    let k = Keter::start("reverse");
    // The reversed server: the example app started by the test itself.
    let port = free_port();
    let mut server = Command::new(hello_binary())
        .args(["--version-string", "backend"])
        .env("PORT", port.to_string())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let yaml = format!(
        "stanzas:\n  - type: reverse-proxy\n    reversed-host: 127.0.0.1\n    reversed-port: {port}\n    reversing-host: api.example.com\n  - type: reverse-proxy\n    reversed-host: 127.0.0.1\n    reversed-port: {port}\n    reversing-host: kept.example.com\n    preserve-host: true\n"
    );
    deploy(
        &k,
        "proxy",
        BundleBuilder::new().file("config/keter.yaml", yaml.into_bytes(), 0o644),
    );
    k.wait_for("api.example.com", "backend", WAIT);
    assert_eq!(
        k.get("api.example.com", "/host").unwrap().body.trim(),
        "127.0.0.1"
    );
    assert_eq!(
        k.get("kept.example.com", "/host").unwrap().body.trim(),
        "kept.example.com"
    );
    server.kill().unwrap();
    server.wait().unwrap();
}

#[test]
fn a_static_root_outside_the_bundle_is_refused() {
    let k = Keter::start("static-escape");
    for (i, root) in ["../..", "/etc", "../config/../../x"].iter().enumerate() {
        let yaml = format!(
            "stanzas:\n  - type: static-files\n    hosts: [s{i}.example.com]\n    root: {root}\n"
        );
        let before = k.last_deploy("escape");
        deploy(
            &k,
            "escape",
            BundleBuilder::new().file("config/keter.yaml", yaml.into_bytes(), 0o644),
        );
        k.wait_next_deploy("escape", before.as_ref(), DeployResult::Failed, WAIT);
    }
    let log = k.log();
    assert!(
        log.contains("stanzas[0].root: ../.. resolves to ")
            && log.contains("outside the bundle; the global allowed-static-roots lists no folder"),
        "{log}"
    );
    assert!(
        log.contains("stanzas[0].root: /etc resolves to /etc, outside the bundle"),
        "{log}"
    );
    assert!(!k.root.join("nginx/apps/escape.conf").exists());
}

#[test]
fn wildcard_hosts_match_one_label_and_exact_hosts_win() {
    let k = Keter::start("wildcard");
    k.deploy_hello("wild", "wild", "*.wild.example.com", &[]);
    k.deploy_hello("exact", "exact", "www.wild.example.com", &[]);
    k.deploy_hello("middle", "middle", "api.*.example.net", &[]);
    k.wait_for("a.wild.example.com", "wild", WAIT);
    k.wait_for("www.wild.example.com", "exact", WAIT);
    k.wait_for("api.eu.example.net", "middle", WAIT);
    assert_eq!(
        k.get("A.Wild.Example.com", "/").unwrap().body.trim(),
        "wild"
    );
    for miss in [
        "a.b.wild.example.com",
        "wild.example.com",
        "api.a.b.example.net",
    ] {
        assert_eq!(k.get(miss, "/").unwrap().status, 404, "{miss}");
    }
}

#[test]
fn hundreds_of_long_host_names_load() {
    let k = Keter::start("many-hosts");
    let hosts: Vec<String> = (0..300)
        .map(|i| format!("{}-{i}.{}.example.com", "h".repeat(55), "x".repeat(60)))
        .collect();
    let yaml = format!(
        "stanzas:\n  - type: webapp\n    exec: ../dist/hello\n    args: [--version-string, many]\n    hosts: [{}]\n",
        hosts.join(", ")
    );
    deploy(&k, "many", BundleBuilder::hello(&yaml));
    k.wait_for(&hosts[0], "many", WAIT);
    assert_eq!(k.get(&hosts[299], "/").unwrap().body.trim(), "many");
}

#[test]
fn tls_listener_http2_requires_secure_and_a_bundle_certificate() {
    require_nginx();
    let dir = TempDir::new("tls-certs");
    let (cert, key) = self_signed(&dir.0, "tls.example.com");
    let tls_port = free_port();
    let k = Keter::start_with(
        "tls",
        Opts {
            extra: format!(
                "ssl: {{host: 127.0.0.1, port: {tls_port}, key: {}, certificate: {}}}\nexternal-https-port: {tls_port}\n",
                key.display(),
                cert.display()
            ),
            ..Opts::default()
        },
    );
    let (own_cert, own_key) = self_signed(&dir.0, "own.example.com");
    let yaml = "stanzas:\n  - type: webapp\n    exec: ../dist/hello\n    args: [--version-string, secure]\n    hosts: [tls.example.com]\n    requires-secure: true\n    ssl: true\n  - type: webapp\n    exec: ../dist/hello\n    args: [--version-string, own]\n    hosts: [own.example.com]\n    ssl: {key: ../tls/own.key, certificate: ../tls/own.crt}\n";
    let b = BundleBuilder::hello(yaml)
        .file("tls/own.crt", fs::read(own_cert).unwrap(), 0o644)
        .file("tls/own.key", fs::read(own_key).unwrap(), 0o600);
    deploy(&k, "secure", b);
    k.wait_serving("secure", WAIT);

    let (status, headers, _) = request(k.addr(), "tls.example.com", "/path?q=1");
    assert_eq!(status, 301);
    assert_eq!(
        header(&headers, "location"),
        Some(format!("https://tls.example.com:{tls_port}/path?q=1").as_str())
    );
    let (version, subject, body) = curl_tls(tls_port, "tls.example.com", "/");
    assert_eq!(
        (version.as_str(), body.trim()),
        ("2", "secure"),
        "{subject}"
    );
    assert!(subject.contains("CN=tls.example.com"), "{subject}");
    let env = curl_tls(tls_port, "tls.example.com", "/env").2;
    assert!(
        env.contains(&format!("APPROOT=https://tls.example.com:{tls_port}")),
        "{env}"
    );

    let (_, subject, body) = curl_tls(tls_port, "own.example.com", "/");
    assert_eq!(body.trim(), "own");
    assert!(subject.contains("CN=own.example.com"), "{subject}");
    // The bundle's key was copied out of the bundle (one pair per stanza), readable by
    // keter's user only.
    let certs = fs::read_dir(k.root.join("etc/certs"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    use std::os::unix::fs::PermissionsExt;
    let keys: Vec<_> = fs::read_dir(&certs)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with("-key.pem"))
        .collect();
    assert!(!keys.is_empty(), "no key copied into {}", certs.display());
    for key in keys {
        let mode = fs::metadata(&key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{}", key.display());
    }
    // ACME challenges are answered on plain HTTP even for a requires-secure host.
    let challenge = k.root.join("acme/.well-known/acme-challenge");
    fs::create_dir_all(&challenge).unwrap();
    fs::write(challenge.join("token123"), "proof\n").unwrap();
    let (status, _, body) = request(
        k.addr(),
        "tls.example.com",
        "/.well-known/acme-challenge/token123",
    );
    assert_eq!((status, body.as_str()), (200, "proof\n"));
    let (status, _, body) = request(
        k.addr(),
        "not-deployed.example.com",
        "/.well-known/acme-challenge/token123",
    );
    assert_eq!((status, body.as_str()), (200, "proof\n"));
}

#[test]
fn a_websocket_stays_open_across_a_redeploy_until_drained() {
    let k = Keter::start_with(
        "websocket",
        Opts {
            drain_time: 4.0,
            ..Opts::default()
        },
    );
    k.deploy_hello("ws", "v1", "ws.example.com", &[]);
    k.wait_for("ws.example.com", "v1", WAIT);
    let mut s = TcpStream::connect(k.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET /ws HTTP/1.1\r\nHost: ws.example.com\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    )
    .unwrap();
    let mut buf = [0u8; 1024];
    let n = s.read(&mut buf).unwrap();
    assert!(
        String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
    let mut echo = |msg: &str| -> String {
        s.write_all(msg.as_bytes()).unwrap();
        let n = s.read(&mut buf).unwrap_or(0);
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    assert_eq!(echo("one"), "v1:one");
    k.deploy_hello("ws", "v2", "ws.example.com", &[]);
    k.wait_for("ws.example.com", "v2", WAIT);
    // New requests reach v2; the open tunnel still talks to v1.
    assert_eq!(echo("two"), "v1:two");
    k.wait_log("still had connections at drain-time", WAIT);
    // The line above comes just before v1 is stopped; its own line comes once it is gone.
    k.wait_log("ws: stopped pid", WAIT);
    assert_eq!(
        echo("three"),
        "",
        "the tunnel should close when v1 is stopped"
    );
}
