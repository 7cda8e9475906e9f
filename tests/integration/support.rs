//! Test harness: a real `keter` binary with its own managed Nginx in a fresh temp root, real
//! bundles built from `examples/hello`, and real HTTP clients.

#![allow(dead_code)]

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub use keter::probe::Response;
pub use keter::report::DeployResult;

/// A temp folder removed on drop unless the test failed (then it is kept for inspection).
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(label: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir()
            .join("keter-tests")
            .join(format!("{label}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() || std::env::var_os("KETER_KEEP_TEST_DIRS").is_some() {
            eprintln!("test files kept in {}", self.0.display());
        } else {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

/// Fails with a clear message when Nginx is missing: tests never pass by skipping.
pub fn require_nginx() {
    let ok = Command::new("nginx")
        .arg("-v")
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "nginx is not installed: run `apt-get install -y nginx` (the README's test command does)"
    );
}

/// The example app built by `cargo test` (examples are built with the tests).
pub fn hello_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let target = exe.parent().unwrap().parent().unwrap();
    let hello = target.join("examples").join("hello");
    assert!(
        hello.exists(),
        "{} is missing: run `cargo build --examples` or `cargo test`",
        hello.display()
    );
    hello
}

/// Builds a bundle: `files` are (path, content, mode); `hello` adds the example app as
/// `dist/hello`.
pub struct BundleBuilder {
    files: Vec<(String, Vec<u8>, u32)>,
}

impl BundleBuilder {
    pub fn new() -> BundleBuilder {
        BundleBuilder { files: Vec::new() }
    }

    /// The example app as `dist/hello` and `config/keter.yaml` with `yaml`.
    pub fn hello(yaml: &str) -> BundleBuilder {
        BundleBuilder::new()
            .file("dist/hello", fs::read(hello_binary()).unwrap(), 0o755)
            .file("config/keter.yaml", yaml.as_bytes().to_vec(), 0o644)
    }

    pub fn file(mut self, path: &str, content: Vec<u8>, mode: u32) -> BundleBuilder {
        self.files.push((path.to_string(), content, mode));
        self
    }

    /// Writes the gzip-compressed tar file to `out`.
    pub fn write(&self, out: &Path) {
        let file = fs::File::create(out).unwrap();
        let gz = flate2::write::GzEncoder::new(file, flate2::Compression::fast());
        let mut tar = tar::Builder::new(gz);
        for (path, content, mode) in &self.files {
            let mut header = tar::Header::new_gnu();
            header.set_size(content.len() as u64);
            header.set_mode(*mode);
            header.set_entry_type(tar::EntryType::Regular);
            header.set_mtime(1_700_000_000);
            tar.append_data(&mut header, path, content.as_slice())
                .unwrap();
        }
        tar.into_inner().unwrap().finish().unwrap();
    }
}

/// Incompressible bytes (xorshift): a bundle of them is as large compressed as `len`, and
/// takes its time to unpack.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The flat-format `keter.yaml` of the example app answering `version` on `host`.
pub fn hello_yaml(version: &str, host: &str, extra_args: &[&str]) -> String {
    let mut args = vec!["--version-string".to_string(), version.to_string()];
    args.extend(extra_args.iter().map(|a| a.to_string()));
    let args: Vec<String> = args.iter().map(|a| format!("{a:?}")).collect();
    format!(
        "exec: ../dist/hello\nargs: [{}]\nhost: {host:?}\n",
        args.join(", ")
    )
}

/// Options of a test daemon.
pub struct Opts {
    pub readiness_timeout: f64,
    pub drain_time: f64,
    pub stop_timeout: f64,
    /// More YAML lines for `keter-config.yaml`.
    pub extra: String,
    /// How many app ports the daemon may hand out.
    pub ports: u16,
    /// The first app port (by default a block distinct from other tests').
    pub first_port: Option<u16>,
    pub reload_timeout: f64,
    /// The front-end port; a free one when `None`.
    pub port: Option<u16>,
    /// keter's limit of open files (soft, hard) when it starts, as systemd gives its services
    /// (1024, 524288); the test's own when `None`.
    pub open_files: Option<(u64, u64)>,
    /// The `nginx` key as a YAML flow mapping; a managed Nginx when `None`.
    pub nginx: Option<String>,
    /// keter's root; `root/` in the test's folder when `None`.
    pub root: Option<PathBuf>,
    /// Where the status interface listens.
    pub status: StatusAt,
    /// Put the root on a tmpfs of this many MiB (disk-full tests; needs root).
    pub tmpfs_mib: Option<u64>,
    /// The keter binary to start (a copy that a test replaces, say); `KETER_BIN` or the one
    /// cargo built when `None`.
    pub binary: Option<PathBuf>,
    /// More environment variables for keter.
    pub env: Vec<(String, String)>,
    /// The `listeners` value as YAML, instead of one on `127.0.0.1:port`; `{port}` in it is
    /// replaced by the front-end port.
    pub listeners: Option<String>,
}

/// The `status` key of a test daemon. Tests never use the default `127.0.0.1:4080`: many
/// daemons run at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusAt {
    /// `status.sock` in the test's folder.
    Socket,
    /// A free loopback port.
    Tcp,
    /// This address.
    At(SocketAddr),
    /// `status: false`.
    Disabled,
}

impl Default for Opts {
    fn default() -> Opts {
        Opts {
            readiness_timeout: 5.0,
            drain_time: 3.0,
            stop_timeout: 2.0,
            extra: String::new(),
            ports: 20,
            first_port: None,
            reload_timeout: 10.0,
            port: None,
            nginx: None,
            root: None,
            status: StatusAt::Socket,
            tmpfs_mib: None,
            binary: None,
            env: Vec::new(),
            listeners: None,
            open_files: None,
        }
    }
}

/// A running `keter` with its managed Nginx on a free loopback port.
pub struct Keter {
    pub dir: TempDir,
    pub root: PathBuf,
    pub config_path: PathBuf,
    pub port: u16,
    pub log_path: PathBuf,
    /// The status interface's address as the config says it (`None` when disabled).
    pub status: Option<keter::status::StatusAddress>,
    child: Option<Child>,
    /// The root is a tmpfs mounted by the harness.
    tmpfs: bool,
    /// The binary `launch` starts.
    pub bin: PathBuf,
    env: Vec<(String, String)>,
    open_files: Option<(u64, u64)>,
}

/// The soft and hard limits of open files of process `pid`, as `/proc` writes them.
pub fn open_files(pid: i32) -> (String, String) {
    let limits = fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let mut fields = line["Max open files".len()..].split_whitespace();
    (
        fields.next().unwrap().to_string(),
        fields.next().unwrap().to_string(),
    )
}

/// A free loopback port (bind to 0, then release it).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A block of `count` app ports distinct from other tests in this run.
fn port_range(count: u16) -> (u16, u16) {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let offset = NEXT.fetch_add(u32::from(count), Ordering::Relaxed) % 4_000;
    let base = 20_000 + (std::process::id() % 5) * 4_000 + offset;
    (base as u16, (base + u32::from(count) - 1) as u16)
}

impl Keter {
    pub fn start(label: &str) -> Keter {
        Keter::start_with(label, Opts::default())
    }

    pub fn start_with(label: &str, opts: Opts) -> Keter {
        require_nginx();
        sweep_stale_tests();
        let dir = TempDir::new(label);
        let root = opts.root.unwrap_or_else(|| dir.0.join("root"));
        let port = opts.port.unwrap_or_else(free_port);
        let nginx = opts.nginx.unwrap_or_else(|| {
            format!("{{mode: managed, reload-timeout: {}}}", opts.reload_timeout)
        });
        let (first, last) = match opts.first_port {
            Some(p) => (p, p + opts.ports - 1),
            None => port_range(opts.ports),
        };
        let config_path = dir.0.join("keter-config.yaml");
        let status = match opts.status {
            StatusAt::Socket => Some(keter::status::StatusAddress::Unix(
                dir.0.join("status.sock"),
            )),
            StatusAt::Tcp => Some(keter::status::StatusAddress::Tcp(SocketAddr::from((
                [127, 0, 0, 1],
                free_port(),
            )))),
            StatusAt::At(a) => Some(keter::status::StatusAddress::Tcp(a)),
            StatusAt::Disabled => None,
        };
        let status_line = match &status {
            Some(keter::status::StatusAddress::Unix(p)) => p.display().to_string(),
            Some(keter::status::StatusAddress::Tcp(a)) => a.to_string(),
            None => "false".to_string(),
        };
        let listeners = opts
            .listeners
            .map(|l| l.replace("{port}", &port.to_string()))
            .unwrap_or_else(|| format!("[{{host: 127.0.0.1, port: {port}}}]"));
        fs::write(
            &config_path,
            format!(
                "root: {}\nlisteners: {listeners}\nnginx: {nginx}\nreadiness-timeout: {}\ndrain-time: {}\nstop-timeout: {}\nport-range: {first}-{last}\nstatus: {status_line}\ncgroup: {}\n{}",
                root.display(),
                opts.readiness_timeout,
                opts.drain_time,
                opts.stop_timeout,
                cgroup_of(&dir.0),
                opts.extra
            ),
        )
        .unwrap();
        if let Some(mib) = opts.tmpfs_mib {
            fs::create_dir_all(&root).unwrap();
            let ok = Command::new("mount")
                .args([
                    "-t",
                    "tmpfs",
                    "-o",
                    &format!("size={mib}m,mode=0755"),
                    "tmpfs",
                ])
                .arg(&root)
                .status()
                .is_ok_and(|s| s.success());
            assert!(
                ok,
                "cannot mount a tmpfs on {} (the disk-full tests run as root)",
                root.display()
            );
        }
        // KETER_BIN runs another build (to compare two builds with the benchmarks).
        let bin = opts.binary.unwrap_or_else(|| {
            std::env::var_os("KETER_BIN")
                .unwrap_or_else(|| env!("CARGO_BIN_EXE_keter").into())
                .into()
        });
        let mut k = Keter {
            env: opts.env,
            open_files: opts.open_files,
            bin,
            root,
            config_path,
            port,
            log_path: dir.0.join("keter.log"),
            status,
            dir,
            child: None,
            tmpfs: opts.tmpfs_mib.is_some(),
        };
        k.launch();
        k
    }

    /// Starts the binary (again) on the same root and waits until it watches `incoming/` and
    /// its Nginx answers.
    pub fn launch(&mut self) {
        self.launch_with(|_| {});
    }

    /// [`Keter::launch`] with the command changed by `prepare` first (descriptors to pass, a
    /// wrapper).
    pub fn launch_with(&mut self, prepare: impl FnOnce(&mut Command)) {
        let started_before = self.log_count("keter: watching");
        self.spawn(prepare);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if self.log_count("keter: watching") > started_before
                && let Ok(r) = self.get("nobody.invalid", "/")
            {
                assert_eq!(r.status, 404, "{r:?}");
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("keter exited at start with {status}:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "keter did not start:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the binary (again) on the same root.
    pub fn launch_no_wait(&mut self) {
        self.spawn(|_| {});
    }

    fn spawn(&mut self, prepare: impl FnOnce(&mut Command)) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .unwrap();
        let mut cmd = Command::new(&self.bin);
        cmd.arg(&self.config_path)
            .env(
                "RUST_LOG",
                std::env::var("KETER_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("KETER_TEST_SECRET", "inherited-by-keter")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        if let Some((soft, hard)) = self.open_files {
            let limit = libc::rlimit {
                rlim_cur: soft,
                rlim_max: hard,
            };
            // SAFETY: setrlimit is async-signal-safe and reads the struct it is given.
            unsafe {
                std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        prepare(&mut cmd);
        self.child = Some(cmd.spawn().unwrap());
    }

    /// True (and forgotten) once the keter started last has exited.
    pub fn exited(&mut self) -> bool {
        let gone = self
            .child
            .as_mut()
            .is_none_or(|c| c.try_wait().unwrap().is_some());
        if gone {
            self.child = None;
        }
        gone
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn incoming(&self) -> PathBuf {
        self.root.join("incoming")
    }

    /// Copies a bundle in under a temporary name and renames it to `NAME.keter`.
    pub fn deploy(&self, name: &str, bundle: &Path) {
        let tmp = self.incoming().join(format!(".{name}.keter.part"));
        fs::copy(bundle, &tmp).unwrap();
        fs::rename(&tmp, self.incoming().join(format!("{name}.keter"))).unwrap();
    }

    /// Puts a bundle in by a hard link under a temporary name and a rename (no copy: for
    /// tests that deploy hundreds of times).
    pub fn deploy_linked(&self, name: &str, bundle: &Path) {
        let tmp = self.incoming().join(format!(".{name}.keter.part"));
        let _ = fs::remove_file(&tmp);
        fs::hard_link(bundle, &tmp).unwrap();
        fs::rename(&tmp, self.incoming().join(format!("{name}.keter"))).unwrap();
    }

    /// Builds and deploys the example app answering `version` on `host`.
    pub fn deploy_hello(&self, name: &str, version: &str, host: &str, args: &[&str]) -> PathBuf {
        let path = self.dir.0.join(format!("{name}-{version}.keter"));
        BundleBuilder::hello(&hello_yaml(version, host, args)).write(&path);
        self.deploy(name, &path);
        path
    }

    pub fn get(&self, host: &str, path: &str) -> std::io::Result<Response> {
        keter::probe::get_tcp(self.addr(), host, path, Duration::from_secs(5))
    }

    /// Waits until `host` answers 200 with `body` (trimmed) and keeps doing so for 300 ms;
    /// returns how long it took until the first such answer. (For about 100 ms after a reload
    /// Nginx's previous workers still accept connections with the previous configuration.)
    pub fn wait_for(&self, host: &str, body: &str, timeout: Duration) -> Duration {
        let start = Instant::now();
        let mut first: Option<Instant> = None;
        loop {
            let good = self
                .get(host, "/")
                .is_ok_and(|r| r.status == 200 && r.body.trim() == body);
            match (good, first) {
                (true, None) => first = Some(Instant::now()),
                (true, Some(t)) if t.elapsed() >= Duration::from_millis(300) => {
                    return t - start;
                }
                (true, Some(_)) => {}
                (false, _) => first = None,
            }
            assert!(
                start.elapsed() < timeout,
                "{host} never answered {body:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The pid of the example app's process serving `host` (its `/pid` answer).
    pub fn pid_of(&self, host: &str) -> i32 {
        let r = self.get(host, "/pid").unwrap();
        r.body
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("/pid on {host} answered {r:?}:\n{}", self.log()))
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// `app` as the status API reports it (`GET /api/apps/NAME`, README "Status interface");
    /// `None` while keter does not know the app or its status interface does not answer (a
    /// keter starting, or handing over to its next binary).
    pub fn app_status(&self, app: &str) -> Option<AppStatus> {
        let path = format!("/api/apps/{app}");
        let json = self.app_json(app)?;
        Some(
            serde_json::from_value(json.clone())
                .unwrap_or_else(|e| panic!("{path} is not an app's report: {e}: {json}")),
        )
    }

    /// `GET /api/apps/NAME` as JSON; `None` as for [`Keter::app_status`].
    pub fn app_json(&self, app: &str) -> Option<serde_json::Value> {
        let path = format!("/api/apps/{app}");
        let timeout = Duration::from_secs(5);
        let r = match self
            .status
            .as_ref()
            .expect("the status interface is enabled")
        {
            keter::status::StatusAddress::Tcp(a) => {
                keter::probe::get_tcp(*a, "keter-status", &path, timeout)
            }
            keter::status::StatusAddress::Unix(p) => keter::probe::get_unix(p, &path, timeout),
        }
        .ok()?;
        if r.status != 200 {
            return None;
        }
        Some(
            serde_json::from_str(&r.body)
                .unwrap_or_else(|e| panic!("{path} is not JSON: {e}: {}", r.body)),
        )
    }

    /// Waits until the status API reports `app` so that `done` holds; returns that report.
    /// `what` says what was awaited when it never comes.
    pub fn wait_app(
        &self,
        app: &str,
        what: &str,
        timeout: Duration,
        done: impl Fn(&AppStatus) -> bool,
    ) -> AppStatus {
        let start = Instant::now();
        loop {
            let status = self.app_status(app);
            if let Some(s) = status.as_ref().filter(|s| done(s)) {
                return s.clone();
            }
            assert!(
                start.elapsed() < timeout,
                "the status API never reported {app} {what}; last report {status:#?}\nketer's log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until deploy `n` of `app` (counted within this run of keter) serves.
    pub fn wait_deploy(&self, app: &str, n: u64, timeout: Duration) -> AppStatus {
        self.wait_app(app, &format!("serving deploy {n}"), timeout, |s| {
            s.deploy == Some(n)
        })
    }

    /// Waits until a version of `app` serves (its first deploy switched).
    pub fn wait_serving(&self, app: &str, timeout: Duration) -> AppStatus {
        self.wait_app(app, "serving a version", timeout, |s| s.deploy.is_some())
    }

    /// Waits until `app` serves the bundle with this sha256 (hex).
    pub fn wait_serving_sha256(&self, app: &str, sha256: &str, timeout: Duration) -> AppStatus {
        self.wait_app(app, &format!("serving sha256 {sha256}"), timeout, |s| {
            s.sha256.as_deref() == Some(sha256)
        })
    }

    /// Waits until `app` is in `state` (`running`, `failed`, `stopped`, `crash-looping`...).
    pub fn wait_state(&self, app: &str, state: &str, timeout: Duration) -> AppStatus {
        self.wait_app(app, &format!("in state {state}"), timeout, |s| {
            s.state == state
        })
    }

    /// Waits until `app` is stopped (its bundle removed): no version serves, no process runs.
    pub fn wait_stopped(&self, app: &str, timeout: Duration) -> AppStatus {
        self.wait_app(app, "stopped", timeout, |s| {
            s.state == "stopped" && s.processes.is_empty() && s.draining == 0
        })
    }

    /// The last deploy of `app` as the status API has it now: pass it to
    /// [`Keter::wait_next_deploy`] to wait for the deploy after it.
    pub fn last_deploy(&self, app: &str) -> Option<LastDeploy> {
        self.app_status(app).and_then(|s| s.last_deploy)
    }

    /// Waits until a deploy of `app` other than `before` ends with `result`; returns it.
    pub fn wait_next_deploy(
        &self,
        app: &str,
        before: Option<&LastDeploy>,
        result: DeployResult,
        timeout: Duration,
    ) -> LastDeploy {
        let s = self.wait_app(
            app,
            &format!("with a new deploy that ended {}", result.as_str()),
            timeout,
            |s| {
                s.last_deploy
                    .as_ref()
                    .is_some_and(|d| d.result == result && Some(d) != before)
            },
        );
        s.last_deploy.unwrap()
    }

    /// Waits until `app`'s last deploy ended with `result` (at once when it already has: for a
    /// deploy whose result may repeat an earlier one's, [`Keter::wait_next_deploy`]).
    pub fn wait_deploy_result(
        &self,
        app: &str,
        result: DeployResult,
        timeout: Duration,
    ) -> LastDeploy {
        self.wait_next_deploy(app, None, result, timeout)
    }

    /// Waits until `app`'s processes were restarted `n` times in all (its serving version's).
    pub fn wait_restarts(&self, app: &str, n: u64, timeout: Duration) -> AppStatus {
        self.wait_app(app, &format!("with {n} restarts"), timeout, |s| {
            s.restarts >= n
        })
    }

    /// Waits until keter's log contains `needle`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) {
        let start = Instant::now();
        while !self.log().contains(needle) {
            assert!(
                start.elapsed() < timeout,
                "keter's log never said {needle:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Number of times `needle` appears in keter's log.
    pub fn log_count(&self, needle: &str) -> usize {
        self.log().matches(needle).count()
    }

    /// Folders in `temp/`.
    pub fn temp_folders(&self) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(self.root.join("temp"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    /// Waits until `temp/` holds exactly `n` version folders: a failed or retired version's
    /// folder is removed by a stage of its own, after its deploy is already reported.
    pub fn wait_temp_folders(&self, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.temp_folders().len() != n {
            assert!(
                Instant::now() < deadline,
                "expected {n} version folders, found {:?}\n{}",
                self.temp_folders(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The pid of the Nginx master keter runs.
    pub fn nginx_pid(&self) -> i32 {
        fs::read_to_string(self.root.join("nginx/nginx.pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    /// Sends `sig` to keter without waiting.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).unwrap();
    }

    /// Waits for keter to exit by itself.
    pub fn wait_exited(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("keter is running");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("keter did not exit:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until `needle` appears in keter's log at least `n` times.
    pub fn wait_log_count(&self, needle: &str, n: usize, timeout: Duration) {
        let start = Instant::now();
        while self.log_count(needle) < n {
            assert!(
                start.elapsed() < timeout,
                "keter's log never said {needle:?} {n} times:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends `sig` to keter and waits for it to exit (a keter that is already gone is only
    /// waited for).
    pub fn signal_and_wait(&mut self, sig: nix::sys::signal::Signal) -> ExitStatus {
        let mut child = self.child.take().expect("keter is running");
        match nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), sig) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
            Err(e) => panic!("cannot send {sig} to keter: {e}"),
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("keter did not exit after {sig}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Keter {
    /// Stops keter, then cleans up whatever happened before: what the root still runs (a
    /// test that failed after killing keter leaves its apps and its Nginx serving, as keter
    /// means them to), the apps' system users and the tmpfs. Only then is keter's exit
    /// status checked, so that a failure leaves nothing behind either.
    fn drop(&mut self) {
        let status = self
            .child
            .is_some()
            .then(|| self.signal_and_wait(nix::sys::signal::Signal::SIGTERM));
        kill_leftovers(&self.root);
        remove_cgroups(&cgroup_of(&self.dir.0));
        remove_app_users(&self.root);
        if self.tmpfs {
            let _ = Command::new("umount").arg(&self.root).status();
        }
        if let Some(status) = status
            && !std::thread::panicking()
        {
            assert!(
                status.success(),
                "keter exited with {status}:\n{}",
                self.log()
            );
        }
    }
}

/// The `cgroup` key of the daemon whose test folder is `dir`: many daemons run at once, and
/// each needs a subtree of its own (their apps have the same names).
pub fn cgroup_of(dir: &Path) -> String {
    format!(
        "/keter-tests/{}",
        dir.file_name().unwrap().to_string_lossy()
    )
}

/// The folders of cgroup `rel` in every hierarchy mounted under `/sys/fs/cgroup`.
pub fn cgroup_dirs(rel: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let top = Path::new("/sys/fs/cgroup");
    if top.join("cgroup.controllers").exists() {
        out.push(top.join(rel.trim_start_matches('/')));
    }
    for e in fs::read_dir(top).into_iter().flatten().flatten() {
        if e.path().join("cgroup.procs").exists() {
            out.push(e.path().join(rel.trim_start_matches('/')));
        }
    }
    out
}

/// Removes a test daemon's cgroup subtree (whatever keter left: its processes are gone by
/// now), in every hierarchy.
pub fn remove_cgroups(rel: &str) {
    fn remove(dir: &Path) {
        for e in fs::read_dir(dir).into_iter().flatten().flatten() {
            if e.path().is_dir() {
                remove(&e.path());
            }
        }
        for _ in 0..100 {
            match fs::remove_dir(dir) {
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                _ => return,
            }
        }
    }
    for d in cgroup_dirs(rel) {
        remove(&d);
    }
}

/// Kills, with their process groups, the processes that still run from `root`: those whose
/// working folder is under it (apps and what they started) and those whose command line names
/// a path under it (the managed Nginx master, whose group holds its workers).
pub fn kill_leftovers(root: &Path) {
    kill_processes_from(|path| path.starts_with(root));
}

/// Kills, with their process groups, the processes whose working folder or a path on whose
/// command line is `from`; never this test process or its group.
fn kill_processes_from(from: impl Fn(&Path) -> bool) {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let own = std::process::id() as i32;
    let own_group = nix::unistd::getpgrp().as_raw();
    for pid in pids() {
        if pid == own || !alive(pid) {
            continue;
        }
        let cwd = fs::read_link(format!("/proc/{pid}/cwd")).ok();
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        let args = cmdline
            .split(['\0', ' '])
            .filter(|a| a.starts_with('/'))
            .map(PathBuf::from);
        if !cwd.into_iter().chain(args).any(|p| from(&p)) {
            continue;
        }
        if let Some(g) = process_group(pid).filter(|g| *g > 1 && *g != own_group) {
            let _ = kill(Pid::from_raw(-g), Signal::SIGKILL);
        }
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

/// Every pid in `/proc`.
fn pids() -> Vec<i32> {
    fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The process group of `pid` (`/proc/PID/stat`, the third field after the name).
fn process_group(pid: i32) -> Option<i32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ")?.1.split(' ').nth(2)?.parse().ok()
}

/// Removes the system users a test daemon created for its apps (listed in
/// `ROOT/etc/app-users`): the machine's user database must not fill up with test users. A
/// name is only removed while it still is this root's user (other test daemons reuse names).
pub fn remove_app_users(root: &Path) {
    let Ok(text) = fs::read_to_string(root.join("etc/app-users")) else {
        return;
    };
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [app, user, uid, _] = fields[..] else {
            continue;
        };
        let ours = nix::unistd::User::from_name(user)
            .ok()
            .flatten()
            .is_some_and(|u| {
                u.uid.as_raw().to_string() == uid
                    && u.gecos.to_str().ok()
                        == Some(format!("keter app {app} in {}", root.display()).as_str())
            });
        if ours {
            userdel(user);
        }
    }
}

fn userdel(user: &str) {
    let _ = Command::new("userdel")
        .arg(user)
        .stderr(Stdio::null())
        .status();
}

/// The test folder (`keter-tests/LABEL-PID-N`) holding `path`, if the test process that made
/// it is gone: a run that was killed, or a failed test's folder kept for inspection.
fn stale_test_folder(path: &Path) -> Option<PathBuf> {
    let tests = std::env::temp_dir().join("keter-tests");
    let name = path.strip_prefix(&tests).ok()?.components().next()?;
    let name = name.as_os_str().to_str()?;
    let mut parts = name.rsplitn(3, '-');
    let (_n, pid) = (parts.next()?, parts.next()?);
    let pid: i32 = pid.parse().ok()?;
    (!alive(pid)).then(|| tests.join(name))
}

/// Once per test binary: cleans up after test runs that were killed before their daemons'
/// cleanup or failed: the tmpfs mounts under their folders, the processes still running from
/// them, and the app users of their roots (or of roots that are gone).
fn sweep_stale_tests() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let tests = std::env::temp_dir().join("keter-tests");
        // Processes first: a mount they use cannot be removed.
        kill_processes_from(|p| stale_test_folder(p).is_some());
        let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let mut stale: Vec<PathBuf> = mounts
            .lines()
            .filter_map(|l| l.split(' ').nth(1))
            .map(PathBuf::from)
            .filter(|m| stale_test_folder(m).is_some())
            .collect();
        // The deepest first: a tmpfs on ROOT/etc inside a tmpfs on ROOT.
        stale.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
        for m in stale {
            let _ = Command::new("umount").arg(&m).status();
        }
        let passwd = fs::read_to_string("/etc/passwd").unwrap_or_default();
        for line in passwd.lines() {
            let fields: Vec<&str> = line.split(':').collect();
            let (Some(user), Some(comment)) = (fields.first(), fields.get(4)) else {
                continue;
            };
            let Some((_, root)) = comment.split_once(" in ") else {
                continue;
            };
            let root = Path::new(root);
            if comment.starts_with("keter app ")
                && root.starts_with(&tests)
                && (!root.exists() || stale_test_folder(root).is_some())
            {
                userdel(user);
            }
        }
    });
}

/// True while a process with this pid exists (and is not a zombie).
pub fn alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat.rsplit_once(") ").map(|(_, r)| r.chars().next());
            !matches!(state, Some(Some('Z')) | Some(Some('X')))
        }
        Err(_) => false,
    }
}

/// Waits until a process is gone.
pub fn wait_gone(pid: i32, timeout: Duration) -> bool {
    let start = Instant::now();
    while alive(pid) {
        if start.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

/// An HTTP/1.1 client that keeps its connection open between requests, like a browser.
pub struct KeepAliveClient {
    addr: SocketAddr,
    conn: Option<BufReader<TcpStream>>,
    /// Requests resent because the server had closed the idle connection before reading
    /// them (what every HTTP client does for idempotent requests, RFC 9112 9.3.1).
    pub resent_after_idle_close: u32,
    /// Responses read on a reused connection.
    pub reused: u32,
    /// Resend a request the server closed the idle connection under (true, as browsers and
    /// curl do); false counts it as failed, as `wrk` does.
    pub resend: bool,
}

impl KeepAliveClient {
    pub fn new(addr: SocketAddr) -> KeepAliveClient {
        KeepAliveClient {
            addr,
            conn: None,
            resent_after_idle_close: 0,
            reused: 0,
            resend: true,
        }
    }

    pub fn get(&mut self, host: &str, path: &str) -> std::io::Result<Response> {
        let reusing = self.conn.is_some();
        match self.try_get(host, path) {
            Ok((r, _)) => {
                if reusing {
                    self.reused += 1;
                }
                Ok(r)
            }
            Err((e, got_bytes)) => {
                self.conn = None;
                if reusing && !got_bytes && self.resend {
                    self.resent_after_idle_close += 1;
                    self.try_get(host, path).map(|(r, _)| r).map_err(|(e, _)| e)
                } else {
                    Err(e)
                }
            }
        }
    }

    fn try_get(
        &mut self,
        host: &str,
        path: &str,
    ) -> Result<(Response, bool), (std::io::Error, bool)> {
        if self.conn.is_none() {
            let s = TcpStream::connect_timeout(&self.addr, Duration::from_secs(5))
                .map_err(|e| (e, false))?;
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            self.conn = Some(BufReader::new(s));
        }
        let conn = self.conn.as_mut().unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n");
        conn.get_mut()
            .write_all(req.as_bytes())
            .map_err(|e| (e, false))?;
        let mut status_line = String::new();
        match conn.read_line(&mut status_line) {
            Ok(0) => return Err((std::io::ErrorKind::UnexpectedEof.into(), false)),
            Ok(_) => {}
            Err(e) => return Err((e, false)),
        }
        let status: u16 = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| {
                (
                    std::io::Error::other(format!("bad status line {status_line:?}")),
                    true,
                )
            })?;
        let mut length = 0usize;
        let mut close = false;
        loop {
            let mut h = String::new();
            conn.read_line(&mut h).map_err(|e| (e, true))?;
            let h = h.trim_end().to_ascii_lowercase();
            if h.is_empty() {
                break;
            }
            if let Some(v) = h.strip_prefix("content-length:") {
                length = v.trim().parse().unwrap_or(0);
            }
            if h == "connection: close" {
                close = true;
            }
        }
        let mut body = vec![0u8; length];
        conn.read_exact(&mut body).map_err(|e| (e, true))?;
        if close {
            self.conn = None;
        }
        Ok((
            Response {
                status,
                body: String::from_utf8_lossy(&body).into_owned(),
            },
            true,
        ))
    }
}

/// Makes a file executable or not.
pub fn set_mode(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// One app as `GET /api/apps/NAME` reports it (`src/report.rs`, README "Status interface").
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct AppStatus {
    pub name: String,
    /// `starting`, `running`, `deploying`, `crash-looping`, `failed` or `stopped`.
    pub state: String,
    /// The serving bundle's sha256 (hex).
    pub sha256: Option<String>,
    /// The serving version's deploy number within this run of keter.
    pub deploy: Option<u64>,
    pub hosts: Vec<String>,
    pub processes: Vec<ProcessStatus>,
    pub restarts: u64,
    pub last_deploy: Option<LastDeploy>,
    pub last_error: Option<String>,
    pub draining: usize,
    /// `unpacking`, `readiness` or `switching` while a deploy is under way.
    pub deploy_stage: Option<String>,
    /// The serving version's site, rendered again, waits for Nginx to take it.
    #[serde(default)]
    pub site_pending: bool,
}

impl AppStatus {
    /// The pids of the serving version's processes that run.
    pub fn pids(&self) -> Vec<i32> {
        self.processes.iter().filter_map(|p| p.pid).collect()
    }
}

/// One process of an app's serving version.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct ProcessStatus {
    /// `webapp` or `background`.
    pub kind: String,
    pub stanza: usize,
    pub port: Option<u16>,
    pub pid: Option<i32>,
    pub restarts: u64,
    /// A webapp's health while it serves (`unchecked`, `healthy`, `failing`, `unhealthy`,
    /// `replacing`); `None` for a background process.
    #[serde(default)]
    pub health: Option<String>,
    #[serde(default)]
    pub health_latency_ms: Option<u64>,
    #[serde(default)]
    pub health_failures: u32,
    #[serde(default)]
    pub health_replacements: u64,
}

/// An app's last deploy.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct LastDeploy {
    pub result: DeployResult,
    pub finished: String,
    pub duration_ms: u64,
    pub error: Option<String>,
    pub error_kind: Option<String>,
    pub retry_at: Option<String>,
}

/// A deployer: a user that is not root and whose group may write `incoming/` (the package's
/// `keter` group), made once for the test binary and shared by its tests.
pub fn deployer() -> (u32, u32) {
    static DEPLOYER: std::sync::OnceLock<(u32, u32)> = std::sync::OnceLock::new();
    *DEPLOYER.get_or_init(|| {
        const NAME: &str = "keter-test-deployer";
        if nix::unistd::User::from_name(NAME).unwrap().is_none() {
            let status = Command::new("useradd")
                .args(["--system", "--user-group", "--no-create-home", "--shell"])
                .args(["/usr/sbin/nologin", NAME])
                .status()
                .unwrap();
            assert!(status.success() || nix::unistd::User::from_name(NAME).unwrap().is_some());
        }
        let u = nix::unistd::User::from_name(NAME).unwrap().unwrap();
        (u.uid.as_raw(), u.gid.as_raw())
    })
}
