//! System mode (the Debian package issue): keter as one tenant of an Nginx it does not run.
//!
//! Each test starts its own "system" Nginx under a private prefix, laid out like Debian's
//! (`conf.d/*.conf` with the package's `nginx/keter.conf`, `sites-enabled/*` with a default
//! server and another site), and points keter at it: `nginx.binary` is a wrapper that adds
//! `-p/-c`, so keter's plain `nginx -t` tests that whole main configuration, and
//! `nginx.pid-file` is that Nginx's pid file. Like Debian's, its master runs as root and its
//! workers as `www-data`.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::support::*;

const HOST: &str = "hello.example.com";
const OTHER: &str = "other.example.com";
const WAIT: Duration = Duration::from_secs(20);

/// An Nginx that plays the host's service: keter never starts or stops it.
struct SystemNginx {
    dir: TempDir,
    port: u16,
    child: Option<Child>,
}

impl SystemNginx {
    /// Lays out the prefix for a keter root at `keter_root` and starts the master.
    fn start(label: &str) -> SystemNginx {
        require_nginx();
        let dir = TempDir::new(label);
        let p = dir.0.clone();
        let port = free_port();
        for sub in ["conf.d", "sites-enabled", "temp", "logs"] {
            fs::create_dir_all(p.join(sub)).unwrap();
        }
        // Debian's nginx.conf (workers as www-data), with every path that Debian's build puts
        // in system folders moved under the prefix.
        fs::write(
            p.join("nginx.conf"),
            format!(
                "user www-data;\nworker_processes 2;\npid {p}/nginx.pid;\nerror_log {p}/logs/error.log;\n\
                 events {{ worker_connections 768; }}\n\
                 http {{\n  sendfile on;\n  tcp_nopush on;\n  types_hash_max_size 2048;\n\
                 default_type application/octet-stream;\n  access_log off;\n  gzip on;\n\
                 client_body_temp_path {p}/temp/body;\n  proxy_temp_path {p}/temp/proxy;\n\
                 fastcgi_temp_path {p}/temp/fastcgi;\n  uwsgi_temp_path {p}/temp/uwsgi;\n\
                 scgi_temp_path {p}/temp/scgi;\n\
                 include {p}/conf.d/*.conf;\n  include {p}/sites-enabled/*;\n}}\n",
                p = p.display()
            ),
        )
        .unwrap();
        // The package's include, with the root it is written for replaced by this test's.
        let shipped =
            fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("nginx/keter.conf"))
                .unwrap();
        assert!(shipped.contains("/opt/keter/nginx/"), "{shipped}");
        let root = p.join("keter-root");
        fs::write(
            p.join("conf.d/keter.conf"),
            shipped.replace("/opt/keter/", &format!("{}/", root.display())),
        )
        .unwrap();
        fs::write(
            p.join("sites-enabled/default"),
            format!(
                "server {{\n  listen 127.0.0.1:{port} default_server;\n  server_name _;\n  default_type text/plain;\n  return 404 \"system default\\n\";\n}}\n"
            ),
        )
        .unwrap();
        fs::write(
            p.join("sites-enabled/other"),
            format!(
                "server {{\n  listen 127.0.0.1:{port};\n  server_name {OTHER};\n  default_type text/plain;\n  return 200 \"other site\\n\";\n}}\n"
            ),
        )
        .unwrap();
        let wrapper = p.join("nginx-wrapper");
        fs::write(
            &wrapper,
            format!(
                "#!/bin/sh\n# The host's nginx, whose compiled-in configuration is {p}/nginx.conf.\nexec nginx -e stderr -p {p} -c {p}/nginx.conf \"$@\"\n",
                p = p.display()
            ),
        )
        .unwrap();
        set_mode(&wrapper, 0o755);
        let mut s = SystemNginx {
            dir,
            port,
            child: None,
        };
        s.run();
        s
    }

    /// Starts the master (again) and waits until it answers.
    fn run(&mut self) {
        let child = Command::new(self.wrapper())
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + WAIT;
        while self.get(OTHER).map(|r| r.status) != Ok(200) || !self.pid_file().exists() {
            assert!(Instant::now() < deadline, "the system Nginx did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the master the way `systemctl stop nginx` does (it removes its pid file).
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill(Pid::from_raw(c.id() as i32), Signal::SIGQUIT).unwrap();
            c.wait().unwrap();
        }
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    fn wrapper(&self) -> PathBuf {
        self.dir.0.join("nginx-wrapper")
    }

    fn pid_file(&self) -> PathBuf {
        self.dir.0.join("nginx.pid")
    }

    fn keter_root(&self) -> PathBuf {
        self.dir.0.join("keter-root")
    }

    fn sites(&self) -> PathBuf {
        self.dir.0.join("sites-enabled")
    }

    fn get(&self, host: &str) -> Result<Response, String> {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], self.port));
        keter::probe::get_tcp(addr, host, "/", Duration::from_secs(5)).map_err(|e| e.to_string())
    }

    /// Every configuration file of the host's Nginx outside keter's root, with its content.
    fn host_files(&self) -> BTreeMap<PathBuf, String> {
        let mut out = BTreeMap::new();
        for sub in ["", "conf.d", "sites-enabled"] {
            for e in fs::read_dir(self.dir.0.join(sub)).unwrap().flatten() {
                if e.file_type().unwrap().is_file()
                    && !e.file_name().to_string_lossy().ends_with(".pid")
                {
                    out.insert(e.path(), fs::read_to_string(e.path()).unwrap_or_default());
                }
            }
        }
        out
    }

    /// Options for a keter that uses this Nginx.
    fn opts(&self) -> Opts {
        Opts {
            port: Some(self.port),
            root: Some(self.keter_root()),
            nginx: Some(format!(
                "{{mode: system, binary: {}, pid-file: {}, reload-timeout: 5}}",
                self.wrapper().display(),
                self.pid_file().display()
            )),
            ..Opts::default()
        }
    }
}

impl Drop for SystemNginx {
    fn drop(&mut self) {
        self.stop();
    }
}

fn body(r: Result<Response, String>) -> String {
    match r {
        Ok(r) => format!("{} {}", r.status, r.body.trim()),
        Err(e) => e,
    }
}

#[test]
fn system_mode_switches_through_the_hosts_nginx_and_leaves_other_sites_alone() {
    let sys = SystemNginx::start("sys-switch-nginx");
    let master = sys.pid();
    let host_files = sys.host_files();
    let mut k = Keter::start_with("sys-switch", sys.opts());

    assert!(
        !k.root.join("nginx/nginx.conf").exists() && !k.root.join("nginx/nginx.pid").exists(),
        "keter wrote a managed Nginx's files in system mode"
    );
    k.deploy_hello("hello", "v1", HOST, &[]);
    k.wait_for(HOST, "v1", WAIT);
    k.deploy_hello("hello", "v2", HOST, &[]);
    k.wait_for(HOST, "v2", WAIT);
    k.wait_deploy("hello", 2, WAIT);

    let conf = fs::read_to_string(k.root.join("nginx/apps/hello.conf")).unwrap();
    assert!(!conf.contains("default_server"), "{conf}");
    let http = fs::read_to_string(k.root.join("nginx/http.conf")).unwrap();
    for directive in [
        "server_names_hash",
        "worker_",
        "pid ",
        "error_log",
        "_temp_path",
    ] {
        assert!(
            !http.contains(directive),
            "{directive} in http.conf:\n{http}"
        );
    }
    assert_eq!(body(sys.get(OTHER)), "200 other site");
    assert_eq!(body(sys.get("unknown.example.com")), "404 system default");
    assert_eq!(sys.pid(), master, "the system Nginx was replaced");
    assert!(alive(master));
    assert_eq!(
        sys.host_files(),
        host_files,
        "keter changed the host's Nginx files"
    );

    // At exit keter takes its files out; the host's Nginx keeps serving everything else.
    let status = k.signal_and_wait(Signal::SIGTERM);
    assert!(status.success(), "{status}:\n{}", k.log());
    assert!(!k.root.join("nginx/http.conf").exists());
    assert!(!k.root.join("nginx/apps/hello.conf").exists());
    let deadline = Instant::now() + WAIT;
    while k.root.join("nginx/control.sock").exists() {
        assert!(
            Instant::now() < deadline,
            "Nginx still listens on keter's control socket"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(body(sys.get(HOST)), "404 system default");
    assert_eq!(body(sys.get(OTHER)), "200 other site");
    assert!(alive(master), "keter stopped the system Nginx");

    // And it comes back on the same Nginx.
    k.launch();
    k.deploy_hello("hello", "v3", HOST, &[]);
    k.wait_for(HOST, "v3", WAIT);
}

#[test]
fn a_broken_site_of_someone_else_fails_the_deploy_and_keeps_the_app_serving() {
    let sys = SystemNginx::start("sys-broken-nginx");
    let k = Keter::start_with("sys-broken", sys.opts());
    k.deploy_hello("hello", "v1", HOST, &[]);
    k.wait_for(HOST, "v1", WAIT);
    let v1_pid: i32 = k.get(HOST, "/pid").unwrap().body.trim().parse().unwrap();

    let broken = sys.sites().join("shop");
    fs::write(
        &broken,
        "server {\n  server_name shop.example.com;\n  bogus_directive on;\n}\n",
    )
    .unwrap();
    k.deploy_hello("hello", "v2", HOST, &[]);
    k.wait_log("which is not keter's file", WAIT);
    let log = k.log();
    let line = log
        .lines()
        .find(|l| l.contains("which is not keter's file"))
        .unwrap();
    assert!(line.contains(&broken.display().to_string()), "{line}");
    assert!(
        line.contains("bogus_directive"),
        "Nginx's message is missing: {line}"
    );
    assert!(
        line.contains("hello:"),
        "the failed deploy is not named: {line}"
    );

    assert_eq!(k.get(HOST, "/").unwrap().body.trim(), "v1");
    assert!(alive(v1_pid), "the serving version was stopped");
    assert!(!k.log().contains("stopping it"), "{}", k.log());
    assert_eq!(body(sys.get(OTHER)), "200 other site");
    let conf = fs::read_to_string(k.root.join("nginx/apps/hello.conf")).unwrap();
    assert!(
        conf.contains("deploy 1 of this app"),
        "v1's file was not restored:\n{conf}"
    );

    // Once the host's problem is fixed, the next deploy goes through.
    fs::remove_file(&broken).unwrap();
    k.deploy_hello("hello", "v3", HOST, &[]);
    k.wait_for(HOST, "v3", WAIT);
}

#[test]
fn with_nginx_stopped_a_deploy_fails_and_the_old_version_is_not_stopped() {
    let mut sys = SystemNginx::start("sys-down-nginx");
    let k = Keter::start_with("sys-down", sys.opts());
    k.deploy_hello("hello", "v1", HOST, &[]);
    k.wait_for(HOST, "v1", WAIT);
    let v1_pid: i32 = k.get(HOST, "/pid").unwrap().body.trim().parse().unwrap();

    // Nginx stopped, and its pid file left behind naming an unrelated process (a crash and a
    // reused pid): keter must not send that process SIGHUP.
    sys.stop();
    let mut bystander = Command::new("sleep").arg("60").spawn().unwrap();
    fs::write(sys.pid_file(), format!("{}\n", bystander.id())).unwrap();
    k.deploy_hello("hello", "v2", HOST, &[]);
    let failed = k.wait_deploy_result("hello", DeployResult::Failed, WAIT);
    assert_eq!(failed.error_kind.as_deref(), Some("nginx"), "{failed:?}");
    k.wait_log("is not an Nginx master", WAIT);
    let still_there = bystander.try_wait().unwrap().is_none();
    let _ = bystander.kill();
    let _ = bystander.wait();
    assert!(still_there, "keter signalled a process that is not Nginx");
    assert!(
        alive(v1_pid),
        "the old version was stopped without a confirmed switch"
    );
    assert!(!k.log().contains("stopping it"), "{}", k.log());

    // When Nginx comes back it loads the files of the version that still runs.
    fs::remove_file(sys.pid_file()).unwrap();
    sys.run();
    assert_eq!(body(sys.get(HOST)), "200 v1");
}

#[test]
fn a_bundle_deleted_while_nginx_refuses_changes_leaves_nginx_at_the_next_change() {
    let sys = SystemNginx::start("sys-delete-nginx");
    let k = Keter::start_with("sys-delete", sys.opts());
    k.deploy_hello("hello", "v1", HOST, &[]);
    k.wait_for(HOST, "v1", WAIT);

    let broken = sys.sites().join("shop");
    fs::write(&broken, "server {\n  bogus_directive on;\n}\n").unwrap();
    fs::remove_file(k.incoming().join("hello.keter")).unwrap();
    k.wait_stopped("hello", WAIT);
    k.wait_log("hello: removing from Nginx failed", WAIT);

    // The operator fixes the host; the next change of any app also takes hello's file out,
    // so its host goes back to the default site instead of a dead port.
    fs::remove_file(&broken).unwrap();
    k.deploy_hello("second", "s1", "second.example.com", &[]);
    k.wait_for("second.example.com", "s1", WAIT);
    assert!(!k.root.join("nginx/apps/hello.conf").exists());
    assert_eq!(body(sys.get(HOST)), "404 system default");
}

/// Runs `args` as the user of the host Nginx's workers; true when it succeeds.
fn as_www_data(args: &[&str]) -> bool {
    Command::new("runuser")
        .args(["-u", "www-data", "--"])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn workers_running_as_www_data_serve_static_roots_and_read_nothing_else() {
    let sys = SystemNginx::start("sys-static-nginx");
    let workers = procfs_workers(sys.pid());
    assert!(!workers.is_empty());
    let www = nix::unistd::User::from_name("www-data").unwrap().unwrap();
    for w in &workers {
        let status = fs::read_to_string(format!("/proc/{w}/status")).unwrap();
        assert!(
            status.contains(&format!("Uid:\t{0}\t{0}", www.uid)),
            "worker {w} is not www-data:\n{status}"
        );
    }
    // The root as the first package left it: temp/ closed to Nginx's workers.
    let root = sys.keter_root();
    fs::create_dir_all(root.join("temp")).unwrap();
    set_mode(&root.join("temp"), 0o750);
    let k = Keter::start_with("sys-static", sys.opts());

    let stanzas = k.dir.0.join("site.keter");
    BundleBuilder::hello(&format!(
        "stanzas:\n  - type: webapp\n    exec: ../dist/hello\n    args: [--version-string, site]\n    host: {HOST}\n  - type: static-files\n    root: ../static\n    hosts: [static.example.com]\n"
    ))
    // A private file in the bundle is still served: the stanza says so.
    .file("static/hello.txt", b"static hello\n".to_vec(), 0o600)
    .file("static/css/site.css", b"body {}\n".to_vec(), 0o644)
    .write(&stanzas);
    k.deploy("site", &stanzas);
    let flat = k.dir.0.join("flat.keter");
    BundleBuilder::hello(
        "exec: ../dist/hello\nargs: [--version-string, flat]\nhost: flat.example.com\nstatic-hosts:\n  - {host: files.example.com, root: ../public}\n",
    )
    .file("public/index.html", b"flat files\n".to_vec(), 0o644)
    .write(&flat);
    k.deploy("flat", &flat);
    k.wait_for(HOST, "site", WAIT);
    k.wait_for("flat.example.com", "flat", WAIT);
    k.wait_serving("site", WAIT);
    k.wait_serving("flat", WAIT);
    let get = |host: &str, path: &str| {
        let r = k.get(host, path).unwrap();
        format!("{} {}", r.status, r.body.trim())
    };
    assert_eq!(get("static.example.com", "/hello.txt"), "200 static hello");
    assert_eq!(get("static.example.com", "/css/site.css"), "200 body {}");
    assert_eq!(get("files.example.com", "/index.html"), "200 flat files");
    // certbot's webroot, as certbot writes it.
    let challenge = k.root.join("acme/.well-known/acme-challenge");
    fs::create_dir_all(&challenge).unwrap();
    fs::write(challenge.join("token-1"), "token-1.key\n").unwrap();
    assert_eq!(
        get(HOST, "/.well-known/acme-challenge/token-1"),
        "200 token-1.key"
    );

    // Nothing else of keter's, nor of the apps', is open to the workers.
    let site = k
        .temp_folders()
        .into_iter()
        .find(|f| f.starts_with("site-"))
        .unwrap();
    let site = k.root.join("temp").join(site);
    assert!(as_www_data(&[
        "cat",
        &site.join("static/hello.txt").display().to_string()
    ]));
    for file in [
        site.join("config/keter.yaml"),
        site.join("dist/hello"),
        k.root.join("etc/processes"),
        k.root.join("nginx/apps/site.conf"),
        k.root.join("log/app-site.log"),
        k.root.join("incoming/site.keter"),
    ] {
        assert!(file.exists(), "{}", file.display());
        assert!(
            !as_www_data(&["cat", &file.display().to_string()]),
            "www-data can read {}",
            file.display()
        );
    }
    for dir in ["temp", "etc", "log", "incoming", "nginx/apps"] {
        let dir = k.root.join(dir).display().to_string();
        assert!(!as_www_data(&["ls", &dir]), "www-data can list {dir}");
    }
}

fn procfs_workers(master: i32) -> Vec<i32> {
    keter::procfs::nginx_workers(master)
        .into_iter()
        .map(|(pid, _)| pid)
        .collect()
}

#[test]
fn files_for_nginx_are_read_by_its_www_data_workers_and_no_app() {
    let sys = SystemNginx::start("sys-worker-files-nginx");
    let pages = sys.dir.0.join("pages");
    fs::create_dir_all(&pages).unwrap();
    fs::write(pages.join("proxy.html"), "<h1>Back soon</h1>\n").unwrap();
    set_mode(&pages.join("proxy.html"), 0o600);
    let mut opts = sys.opts();
    opts.extra = format!(
        "setuid: nobody\nproxy-exception-response-file: {}/proxy.html\n",
        pages.display()
    );
    let k = Keter::start_with("sys-worker-files", opts);
    let yaml = format!(
        "stanzas:\n  - type: webapp\n    exec: ../dist/hello\n    args: [--version-string, guarded]\n    hosts: [{HOST}]\n    middleware:\n      - basic-auth: {{realm: staff, creds: {{jon: rocks}}}}\n  - type: reverse-proxy\n    reversed-host: 127.0.0.1\n    reversed-port: {}\n    reversed-ssl: false\n    reversing-host: down.example.com\n",
        free_port()
    );
    let path = k.dir.0.join("guarded.keter");
    BundleBuilder::hello(&yaml).write(&path);
    k.deploy("guarded", &path);
    k.wait_serving("guarded", WAIT);
    let curl = |host: &str, path: &str, auth: &[&str]| {
        let out = Command::new("curl")
            .args(["-s", "-o", "-", "-w", "\n%{http_code}", "-H"])
            .arg(format!("Host: {host}"))
            .args(auth)
            .arg(format!("http://127.0.0.1:{}{path}", sys.port))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // The host's workers, as www-data, read the password file and the page...
    assert!(curl(HOST, "/", &[]).ends_with("\n401"));
    assert_eq!(curl(HOST, "/", &["-u", "jon:rocks"]), "guarded\n\n200");
    assert_eq!(
        curl("down.example.com", "/", &[]),
        "<h1>Back soon</h1>\n\n502"
    );
    // ...which sit in one folder of the workers' group, that the app (nobody) cannot read.
    use std::os::unix::fs::MetadataExt;
    let files = sys.keter_root().join("nginx/worker-files");
    let www = nix::unistd::Group::from_name("www-data").unwrap().unwrap();
    for f in [
        files.clone(),
        files.join("responses/proxy-exception.html"),
        files.join("apps/guarded"),
    ] {
        let meta = fs::metadata(&f).unwrap();
        assert_eq!(meta.gid(), www.gid.as_raw(), "{}", f.display());
        assert_eq!(meta.mode() & 0o007, 0, "{}: {:o}", f.display(), meta.mode());
    }
    let page = files.join("responses/proxy-exception.html");
    let answer = curl(
        HOST,
        &format!("/read?path={}", page.display()),
        &["-u", "jon:rocks"],
    );
    assert!(answer.contains("Permission denied"), "{answer}");
}
