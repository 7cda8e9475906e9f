//! A real ACME CA on loopback for the certificate tests: Debian's `pebble` (an RFC 8555 test
//! CA), with `pebble-challtestsrv` (from the same package) as its DNS server so that every host
//! name resolves to 127.0.0.1, and pebble's HTTP-01 validation port set to the port keter's
//! Nginx listens on. Each test starts its own, on free ports. A small Nginx in front of pebble
//! stands in for a CA that rate-limits (pebble has no rate limits).

#![allow(dead_code)]

use std::fs;
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{TempDir, free_port};

/// Fails with the package to install when a program is missing: no test passes by skipping.
pub fn require(program: &str, package: &str) {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {program}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "{program} is not installed: run `apt-get install -y {package}` (scripts/test does)"
    );
}

/// A test CA that signs the TLS certificate of pebble's own HTTPS listener (and of the
/// rate-limiting proxy): keter trusts it through `acme.ca-file`, certbot through
/// `REQUESTS_CA_BUNDLE`.
pub struct ListenerCa {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl ListenerCa {
    pub fn new(dir: &Path) -> ListenerCa {
        fs::create_dir_all(dir).unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "keter test listener CA");
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params
            .subject_alt_names
            .push(rcgen::SanType::IpAddress([127, 0, 0, 1].into()));
        let cert = params.signed_by(&key, &ca).unwrap();
        let out = ListenerCa {
            ca: dir.join("listener-ca.pem"),
            cert: dir.join("listener.pem"),
            key: dir.join("listener.key"),
        };
        fs::write(&out.ca, ca.pem()).unwrap();
        fs::write(&out.cert, cert.pem()).unwrap();
        fs::write(&out.key, key.serialize_pem()).unwrap();
        out
    }
}

/// A child process stopped (and reaped) on drop, with its process group when it leads one
/// (an Nginx master's workers would outlive a master killed alone).
struct Guarded(Child);

impl Drop for Guarded {
    fn drop(&mut self) {
        let group = nix::unistd::Pid::from_raw(self.0.id() as i32);
        if nix::unistd::getpgid(Some(group)) == Ok(group) {
            let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_tcp(port: u16, what: &str, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{what} never listened on {port}:\n{}",
            fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// pebble and its DNS server.
pub struct Pebble {
    pub dir: PathBuf,
    /// The ACME directory URL.
    pub directory: String,
    pub port: u16,
    pub management_port: u16,
    pub listener: ListenerCa,
    pub log: PathBuf,
    dns_port: u16,
    pebble: Option<Guarded>,
    _dns: Guarded,
}

/// How pebble is started.
pub struct PebbleOpts {
    /// The port pebble sends HTTP-01 validation requests to (keter's Nginx).
    pub http_port: u16,
    /// Lifetime of the certificates pebble issues.
    pub validity: Duration,
    /// Its ACME port; a free one when `None`.
    pub port: Option<u16>,
}

impl Pebble {
    /// Starts pebble and its DNS server.
    pub fn start(dir: &Path, opts: PebbleOpts) -> Pebble {
        let mut p = Pebble::prepare(dir, opts);
        p.run();
        p
    }

    /// Writes pebble's configuration and starts its DNS server, but not pebble itself (a CA
    /// that is down until [`Pebble::run`]).
    pub fn prepare(dir: &Path, opts: PebbleOpts) -> Pebble {
        require("pebble", "pebble");
        require("pebble-challtestsrv", "pebble");
        fs::create_dir_all(dir).unwrap();
        let listener = ListenerCa::new(&dir.join("listener"));
        let dns_port = free_udp_port();
        let dns_management = free_port();
        let dns_log = dir.join("challtestsrv.log");
        // Every name resolves to 127.0.0.1 (A) and to nothing over IPv6, where keter's Nginx
        // does not listen; no challenge servers of its own.
        let dns = Command::new("pebble-challtestsrv")
            .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
            .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
            .arg("-dns01")
            .arg(format!("127.0.0.1:{dns_port}"))
            .arg("-management")
            .arg(format!("127.0.0.1:{dns_management}"))
            .stdout(fs::File::create(&dns_log).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let dns = Guarded(dns);
        wait_tcp(dns_management, "pebble-challtestsrv", &dns_log);
        let port = opts.port.unwrap_or_else(free_port);
        let management_port = free_port();
        let config = dir.join("pebble-config.json");
        let json = serde_json::json!({
            "pebble": {
                "listenAddress": format!("127.0.0.1:{port}"),
                "managementListenAddress": format!("127.0.0.1:{management_port}"),
                "certificate": listener.cert,
                "privateKey": listener.key,
                "httpPort": opts.http_port,
                "tlsPort": free_port(),
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false,
                "certificateValidityPeriod": opts.validity.as_secs(),
            }
        });
        fs::write(&config, serde_json::to_string_pretty(&json).unwrap()).unwrap();
        Pebble {
            dir: dir.to_path_buf(),
            directory: format!("https://127.0.0.1:{port}/dir"),
            port,
            management_port,
            listener,
            log: dir.join("pebble.log"),
            dns_port,
            pebble: None,
            _dns: dns,
        }
    }

    /// Starts pebble and waits until it listens.
    pub fn run(&mut self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        // No artificial sleeps before validating, no nonces rejected at random: the tests
        // are about keter, not about pebble's lessons for sloppy clients.
        let child = Command::new("pebble")
            .arg("-config")
            .arg(self.dir.join("pebble-config.json"))
            .arg("-dnsserver")
            .arg(format!("127.0.0.1:{}", self.dns_port))
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .env("PEBBLE_AUTHZREUSE", "0")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.pebble = Some(Guarded(child));
        wait_tcp(self.port, "pebble", &self.log);
        wait_tcp(
            self.management_port,
            "pebble's management interface",
            &self.log,
        );
    }

    /// Stops pebble (the DNS server keeps running); nothing answers on its port after this.
    pub fn stop(&mut self) {
        self.pebble = None;
    }

    /// Writes pebble's root certificate into its folder, for curl's `--cacert`.
    pub fn write_root(&self) -> PathBuf {
        let root = self.dir.join("pebble-root.pem");
        fs::write(&root, self.root_pem()).unwrap();
        root
    }

    /// pebble's root certificate (generated at each start), which signs what it issues.
    pub fn root_pem(&self) -> String {
        let out = Command::new("curl")
            .args(["-sS", "--fail", "--max-time", "10", "--cacert"])
            .arg(&self.listener.ca)
            .arg(format!(
                "https://127.0.0.1:{}/roots/0",
                self.management_port
            ))
            .output()
            .expect("curl is needed for the ACME tests (apt-get install curl)");
        assert!(
            out.status.success(),
            "cannot fetch pebble's root: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// pebble's log, for failure messages.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The `acme` section of keter's configuration for this pebble (short retries).
    pub fn keter_config(&self, directory: &str) -> String {
        format!(
            "acme: {{directory: \"{directory}\", email: ops@keter-tests.org, accept-terms: true, ca-file: {}, retry-delay: 1, retry-max-delay: 4}}\n",
            self.listener.ca.display()
        )
    }
}

/// A free UDP port on loopback.
fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A CA that rate-limits: an Nginx in front of pebble that answers every new order with
/// HTTP 429, an RFC 8555 `rateLimited` problem and `Retry-After`, and passes everything else
/// on (with the Host header, so pebble's URLs point back at the proxy).
pub struct RateLimitingProxy {
    pub directory: String,
    _dir: TempDir,
    _nginx: Guarded,
}

impl RateLimitingProxy {
    pub const RETRY_AFTER_SECS: u64 = 3;

    pub fn start(pebble: &Pebble) -> RateLimitingProxy {
        crate::support::require_nginx();
        let dir = TempDir::new("rate-limit-proxy");
        let p = dir.0.display().to_string();
        fs::create_dir_all(dir.0.join("temp")).unwrap();
        let port = free_port();
        let conf = format!(
            "pid {p}/nginx.pid;\nerror_log stderr warn;\nevents {{}}\nhttp {{\n\
             access_log off;\n\
             client_body_temp_path {p}/temp/b; proxy_temp_path {p}/temp/p; fastcgi_temp_path {p}/temp/f; uwsgi_temp_path {p}/temp/u; scgi_temp_path {p}/temp/s;\n\
             server {{\n listen 127.0.0.1:{port} ssl;\n ssl_certificate {cert};\n ssl_certificate_key {key};\n\
             location = /order-plz {{\n  default_type application/problem+json;\n  add_header Retry-After {retry} always;\n\
             return 429 '{{\"type\": \"urn:ietf:params:acme:error:rateLimited\", \"detail\": \"too many new orders recently\", \"status\": 429}}';\n }}\n\
             location / {{\n  proxy_pass https://127.0.0.1:{pebble};\n  proxy_set_header Host $http_host;\n }}\n}}\n}}\n",
            cert = pebble.listener.cert.display(),
            key = pebble.listener.key.display(),
            retry = Self::RETRY_AFTER_SECS,
            pebble = pebble.port,
        );
        fs::write(dir.0.join("nginx.conf"), conf).unwrap();
        let log = dir.0.join("nginx.log");
        let child = Command::new("nginx")
            .process_group(0)
            .args(["-e", "stderr", "-g", "daemon off;", "-p"])
            .arg(&dir.0)
            .arg("-c")
            .arg(dir.0.join("nginx.conf"))
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let nginx = Guarded(child);
        wait_tcp(port, "the rate-limiting Nginx", &log);
        RateLimitingProxy {
            directory: format!("https://127.0.0.1:{port}/dir"),
            _dir: dir,
            _nginx: nginx,
        }
    }
}

/// Runs `openssl verify` of a stored certificate file (key, leaf, chain) against `root_pem`:
/// Ok with openssl's output, or Err with it.
pub fn verify_chain(file: &Path, root_pem: &str, dir: &Path) -> Result<String, String> {
    let text = fs::read_to_string(file).unwrap();
    let mut certs = Vec::new();
    let mut rest = text.as_str();
    while let Some(start) = rest.find("-----BEGIN CERTIFICATE-----") {
        let end = rest[start..].find("-----END CERTIFICATE-----").unwrap() + start + 25;
        certs.push(rest[start..end].to_string());
        rest = &rest[end..];
    }
    assert!(
        certs.len() >= 2,
        "expected a leaf and a chain in {}",
        file.display()
    );
    let root = dir.join("verify-root.pem");
    let leaf = dir.join("verify-leaf.pem");
    let chain = dir.join("verify-chain.pem");
    fs::write(&root, root_pem).unwrap();
    fs::write(&leaf, format!("{}\n", certs[0])).unwrap();
    fs::write(&chain, certs[1..].join("\n") + "\n").unwrap();
    let out = Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(&root)
        .arg("-untrusted")
        .arg(&chain)
        .arg(&leaf)
        .output()
        .expect("openssl is needed for the ACME tests (apt-get install openssl)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(text)
    }
}

/// `curl` over HTTPS to 127.0.0.1:`port` for `host`, trusting only `root` (a file): the body,
/// or curl's error.
pub fn https_get(port: u16, host: &str, path: &str, root: &Path) -> Result<String, String> {
    let out = Command::new("curl")
        .args(["-sS", "--fail", "--max-time", "10", "--cacert"])
        .arg(root)
        .arg("--resolve")
        .arg(format!("{host}:{port}:127.0.0.1"))
        .arg(format!("https://{host}:{port}{path}"))
        .output()
        .expect("curl is needed for the ACME tests (apt-get install curl)");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}
