//! The postgres plugin against a real throwaway PostgreSQL cluster: apps connect with
//! the environment keter gave them, credentials survive redeploys and restarts, and every
//! failure leaves the old version serving and the next deploy finishing the job.
//!
//! One cluster is shared by the tests of this binary (role names are cluster-wide, so every
//! test uses its own app names); tests that stop the server, block CREATE DATABASE or need
//! another `pg_hba.conf` start their own. Apps of the shared cluster log in over its socket
//! folder with their passwords, as keter gives it to them.
//!
//! The attacks: a process of an app takes the server's port, or plants a socket in a socket
//! folder it may write, while no server listens there (`examples/pgsquat.rs`, deployed as an
//! app); keter must send it nothing.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use keter::postgres::{Identifier, derive_identifier};
use postgres::{Client, NoTls};

use crate::support::*;

const WAIT: Duration = Duration::from_secs(30);
const ADMIN: &str = "keter_admin";

/// A PostgreSQL cluster in a temp folder, listening on 127.0.0.1 and a socket in its folder.
/// Socket connections of the tests' superuser are trusted; every other login needs its SCRAM
/// password, over TCP and over the socket, so the passwords keter sets are really checked.
/// keter's admin role may read the server's settings (its socket folder).
pub struct PgCluster {
    dir: PathBuf,
    /// `dir` is a tmpfs of its own (see [`PgCluster::start_with_hba`]).
    tmpfs: bool,
    bin: PathBuf,
    pub port: u16,
    /// The file holding the admin role's password.
    pub password_file: PathBuf,
    pub admin_password: String,
}

/// The server binaries of the newest installed PostgreSQL (Debian: `postgresql-15`).
fn pg_bin() -> PathBuf {
    let mut versions: Vec<PathBuf> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|b| b.join("initdb").exists() && b.join("pg_ctl").exists())
        .collect();
    versions.sort();
    versions.pop().unwrap_or_else(|| {
        panic!(
            "the PostgreSQL server is not installed (no /usr/lib/postgresql/*/bin/initdb): run `apt-get install -y postgresql` (scripts/test does)"
        )
    })
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// The shared cluster's `pg_hba.conf`: apps log in over the socket with their passwords.
const HBA: &str = "local all postgres trust\nlocal all all scram-sha-256\nhost all all 127.0.0.1/32 scram-sha-256\n";

impl PgCluster {
    pub fn start(label: &str) -> PgCluster {
        PgCluster::start_with_hba(label, HBA)
    }

    /// A cluster with this `pg_hba.conf`, which must trust the socket for `postgres`.
    pub fn start_with_hba(label: &str, hba: &str) -> PgCluster {
        let bin = pg_bin();
        // Named as the harness names test folders (`LABEL-PID-N`), so that the sweep after a
        // killed run stops its server and unmounts its tmpfs (`sweep_stale_tests` in
        // support.rs).
        let dir = std::env::temp_dir()
            .join("keter-tests")
            .join(format!("pg-{label}-{}-0", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        // As root, the cluster lives on a tmpfs: by the end of the run the shared one holds
        // thousands of files (a database per app, and their WAL), whose removal from a busy
        // disk took longer than most tests; an unmount frees them at once. Kept folders stay
        // on disk, to be read after the run.
        let tmpfs = is_root()
            && std::env::var_os("KETER_KEEP_TEST_DIRS").is_none()
            && Command::new("mount")
                .args(["-t", "tmpfs", "-o", "size=2g,mode=0755", "tmpfs"])
                .arg(&dir)
                .status()
                .is_ok_and(|s| s.success());
        if is_root() {
            // initdb refuses to run as root; the server runs as the postgres user.
            let pg = nix::unistd::User::from_name("postgres")
                .unwrap()
                .expect("the postgres user exists when the server package is installed");
            std::os::unix::fs::chown(&dir, Some(pg.uid.as_raw()), Some(pg.gid.as_raw())).unwrap();
        }
        let cluster = PgCluster {
            port: free_port(),
            password_file: dir.join("admin-password"),
            admin_password: random_hex(),
            dir,
            tmpfs,
            bin,
        };
        cluster.run(
            "initdb",
            &[
                "-D",
                &cluster.data(),
                "-U",
                "postgres",
                "-A",
                "trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
            ],
        );
        fs::write(cluster.dir.join("data/pg_hba.conf"), hba).unwrap();
        cluster.up();
        let hash = postgres_protocol::password::scram_sha_256(cluster.admin_password.as_bytes());
        cluster
            .superuser("postgres")
            .batch_execute(&format!(
                "CREATE ROLE {ADMIN} LOGIN CREATEROLE CREATEDB PASSWORD '{hash}'; GRANT pg_read_all_settings TO {ADMIN}"
            ))
            .unwrap();
        fs::write(
            &cluster.password_file,
            format!("{}\n", cluster.admin_password),
        )
        .unwrap();
        fs::set_permissions(&cluster.password_file, fs::Permissions::from_mode(0o600)).unwrap();
        cluster
    }

    fn data(&self) -> String {
        self.dir.join("data").display().to_string()
    }

    /// The socket folder (`unix_socket_directories`).
    pub fn socket_folder(&self) -> &std::path::Path {
        &self.dir
    }

    /// A server binary, run as the postgres user when the tests run as root.
    fn command(&self, program: &str) -> Command {
        let exe = self.bin.join(program);
        if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        }
    }

    fn run(&self, program: &str, args: &[&str]) {
        let out = self
            .command(program)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
        assert!(
            out.status.success(),
            "{program} failed: {}\n{}\nserver log:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            fs::read_to_string(self.dir.join("pg.log")).unwrap_or_default()
        );
    }

    /// Starts the server (again, on the same port).
    pub fn up(&self) {
        let options = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {} -c fsync=off",
            self.port,
            self.dir.display()
        );
        let log = self.dir.join("pg.log").display().to_string();
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data(),
                "-l",
                &log,
                "-w",
                "-o",
                &options,
                "start",
            ],
        );
    }

    /// Stops the server; connections are cut.
    pub fn down(&self) {
        self.run("pg_ctl", &["-D", &self.data(), "-m", "fast", "-w", "stop"]);
    }

    /// A superuser session over the socket, for the tests' own checks.
    pub fn superuser(&self, dbname: &str) -> Client {
        postgres::Config::new()
            .host_path(&self.dir)
            .port(self.port)
            .user("postgres")
            .dbname(dbname)
            .connect(NoTls)
            .unwrap()
    }

    /// The global config lines that point keter at this cluster. As root the server runs as
    /// `postgres`, keter's default `server-user`; otherwise as the tests' own user.
    pub fn keter_config(&self) -> String {
        let server_user = if is_root() {
            String::new()
        } else {
            format!("  server-user: {}\n", nix::unistd::geteuid())
        };
        format!(
            "postgres:\n  host: 127.0.0.1\n  port: {}\n  user: {ADMIN}\n  password-file: {}\n{server_user}",
            self.port,
            self.password_file.display()
        )
    }

    pub fn role_exists(&self, role: &str) -> bool {
        self.superuser("postgres")
            .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&role])
            .unwrap()
            .is_some()
    }

    pub fn database_exists(&self, db: &str) -> bool {
        self.superuser("postgres")
            .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&db])
            .unwrap()
            .is_some()
    }

    fn stop_and_remove(&self) {
        let _ = self
            .command("pg_ctl")
            .args(["-D", &self.data(), "-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if self.tmpfs {
            // Lazily: a process of a test may still have its working folder there.
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
        if std::env::var_os("KETER_KEEP_TEST_DIRS").is_none() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        self.stop_and_remove();
    }
}

static SHARED: OnceLock<PgCluster> = OnceLock::new();

extern "C" fn stop_shared_cluster() {
    if let Some(c) = SHARED.get() {
        c.stop_and_remove();
    }
}

/// The cluster shared by this test binary, started by the first test that needs it and
/// stopped when the binary exits (statics are never dropped, hence `atexit`).
pub(crate) fn shared() -> &'static PgCluster {
    SHARED.get_or_init(|| {
        let c = PgCluster::start("shared");
        // SAFETY: registers a plain function with no arguments; it runs at exit.
        unsafe { libc::atexit(stop_shared_cluster) };
        c
    })
}

fn random_hex() -> String {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).unwrap();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The example app built by `cargo test`.
pub(crate) fn pgapp_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let path = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples/pgapp");
    assert!(
        path.exists(),
        "{} is missing: run `cargo test`",
        path.display()
    );
    path
}

/// Writes a bundle of `pgapp` recording `note`, asking for postgres in the stanza format.
fn pgapp_bundle(k: &Keter, name: &str, note: &str, host: &str) -> PathBuf {
    let yaml = format!(
        "stanzas:\n  - type: webapp\n    exec: ../dist/pgapp\n    args: [--note, {note:?}]\n    host: {host}\nplugins:\n  postgres: true\n"
    );
    let path = k.dir.0.join(format!("{name}-{note}.keter"));
    BundleBuilder::new()
        .file("dist/pgapp", fs::read(pgapp_binary()).unwrap(), 0o755)
        .file("config/keter.yaml", yaml.into_bytes(), 0o644)
        .write(&path);
    path
}

fn deploy_pgapp(k: &Keter, name: &str, note: &str, host: &str) {
    let bundle = pgapp_bundle(k, name, note, host);
    k.deploy(name, &bundle);
}

/// Waits until `host` answers `body` and keter has logged its `switches`-th switch of `app`:
/// until then Nginx workers from before the reload may still answer 404.
fn wait_live(k: &Keter, app: &str, host: &str, body: &str, switches: usize) {
    k.wait_for(host, body, WAIT);
    let needle = format!("{app}: switched to deploy");
    let start = std::time::Instant::now();
    while k.log_count(&needle) < switches {
        assert!(start.elapsed() < WAIT, "{app} never switched:\n{}", k.log());
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn start_keter(label: &str, pg: &PgCluster) -> Keter {
    Keter::start_with(
        label,
        Opts {
            readiness_timeout: 20.0,
            extra: pg.keter_config(),
            ..Opts::default()
        },
    )
}

fn store(k: &Keter) -> PathBuf {
    k.root.join("etc/postgres.yaml")
}

/// The recorded password of `app`, read as the YAML it is.
fn recorded_password(k: &Keter, app: &str) -> String {
    let text = fs::read_to_string(store(k)).unwrap();
    let tree = keter::yaml::parse(&text).unwrap();
    tree[app]["pass"].as_str().unwrap().to_string()
}

fn assert_secret_absent(k: &Keter, secret: &str) {
    assert!(secret.len() >= 10);
    let log = k.log();
    assert!(!log.contains(secret), "a secret is in keter's log:\n{log}");
}

#[test]
fn an_app_writes_rows_that_survive_redeploys_and_restarts() {
    let pg = shared();
    let mut k = start_keter("pg-rows", pg);
    let host = "rows.example.com";
    deploy_pgapp(&k, "rows", "one", host);
    wait_live(&k, "rows", host, "one", 1);
    assert_eq!(k.get(host, "/whoami").unwrap().body.trim(), "rows rows");

    // The credentials file: 0600, Keter's fields, a long password, no superuser role.
    let meta = fs::metadata(store(&k)).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let recorded = fs::read_to_string(store(&k)).unwrap();
    let entry = &keter::yaml::parse(&recorded).unwrap()["rows"];
    assert_eq!(entry["name"], "rows");
    assert_eq!(entry["user"], "rows");
    assert_eq!(entry["server"], "127.0.0.1");
    assert_eq!(entry["port"], pg.port);
    let password = recorded_password(&k, "rows");
    assert!(password.len() >= 32, "the password is short");
    let super_or_create: bool = pg
        .superuser("postgres")
        .query_one(
            "SELECT rolsuper OR rolcreaterole OR rolcreatedb FROM pg_roles WHERE rolname = 'rows'",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(!super_or_create, "the app role has admin rights");

    // A redeploy reuses the database: the first row is still there.
    deploy_pgapp(&k, "rows", "two", host);
    k.wait_for(host, "one,two", WAIT);

    // A restarted keter reuses the recorded credentials (the bundle is deployed again).
    let _ = k.signal_and_wait(nix::sys::signal::Signal::SIGTERM);
    k.launch();
    k.wait_for(host, "one,two,two", WAIT);
    assert_eq!(fs::read_to_string(store(&k)).unwrap(), recorded);

    assert_secret_absent(&k, &password);
    assert_secret_absent(&k, &pg.admin_password);
    let app_log = fs::read_to_string(k.root.join("log/app-rows.log")).unwrap();
    assert!(!app_log.contains(&password), "{app_log}");
}

#[test]
fn the_flat_format_and_hostile_app_names_get_valid_distinct_identifiers() {
    let pg = shared();
    let k = start_keter("pg-names", pg);
    let long_prefix = "L".repeat(70);
    let names = [
        "Upper.Case-App".to_string(),
        format!("{long_prefix}-first"),
        format!("{long_prefix}-second"),
    ];
    let mut seen = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let host = format!("names{i}.example.com");
        let yaml =
            format!("exec: ../dist/pgapp\nargs: [--note, n{i}]\nhost: {host}\npostgres: true\n");
        let path = k.dir.0.join(format!("names{i}.keter"));
        BundleBuilder::new()
            .file("dist/pgapp", fs::read(pgapp_binary()).unwrap(), 0o755)
            .file("config/keter.yaml", yaml.into_bytes(), 0o644)
            .write(&path);
        k.deploy(name, &path);
        wait_live(&k, name, &host, &format!("n{i}"), 1);
        let who = k.get(&host, "/whoami").unwrap().body;
        let (role, db) = who.trim().split_once(' ').unwrap();
        assert_eq!(role, db);
        assert!(Identifier::new(role).is_ok(), "{role:?} from {name:?}");
        assert!(role.len() <= 63);
        assert_eq!(role, derive_identifier(name));
        seen.push(role.to_string());
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 3, "{seen:?}");

    // A bundle name that could reach SQL unvalidated is refused before anything is created.
    let path = k.dir.0.join("hostile.keter");
    BundleBuilder::new()
        .file("dist/pgapp", fs::read(pgapp_binary()).unwrap(), 0o755)
        .file(
            "config/keter.yaml",
            b"exec: ../dist/pgapp\nhost: hostile.example.com\npostgres: true\n".to_vec(),
            0o644,
        )
        .write(&path);
    fs::copy(&path, k.incoming().join("x;drop\".keter")).unwrap();
    k.wait_log("refused", WAIT);
    assert!(!pg.role_exists("x_drop_"));
    assert!(!fs::read_to_string(store(&k)).unwrap().contains("drop"));
}

#[test]
fn a_database_dropped_by_hand_is_created_again_with_the_recorded_role() {
    let pg = shared();
    let k = start_keter("pg-dropped", pg);
    let host = "dropped.example.com";
    deploy_pgapp(&k, "dropped", "before", host);
    k.wait_for(host, "before", WAIT);
    let recorded = fs::read_to_string(store(&k)).unwrap();
    pg.superuser("postgres")
        .batch_execute("DROP DATABASE dropped WITH (FORCE)")
        .unwrap();
    deploy_pgapp(&k, "dropped", "after", host);
    k.wait_for(host, "after", WAIT);
    assert!(pg.database_exists("dropped"));
    assert_eq!(fs::read_to_string(store(&k)).unwrap(), recorded);
}

#[test]
fn a_keter_credentials_file_is_read_as_it_is() {
    let pg = shared();
    let k = start_keter("pg-legacy", pg);
    // As Keter wrote it: its random names and 10-letter password, its default server.
    let keter_file = "legacy:\n  name: legacyqwhkzvyxpa\n  user: legacymfkdsuwpel\n  pass: jzkxqvwhre\n  server: localhost\n  port: 5432\n";
    fs::write(store(&k), keter_file).unwrap();
    fs::set_permissions(store(&k), fs::Permissions::from_mode(0o600)).unwrap();
    let host = "legacy.example.com";
    deploy_pgapp(&k, "legacy", "kept", host);
    wait_live(&k, "legacy", host, "kept", 1);
    assert_eq!(
        k.get(host, "/whoami").unwrap().body.trim(),
        "legacymfkdsuwpel legacyqwhkzvyxpa"
    );
    assert_eq!(fs::read_to_string(store(&k)).unwrap(), keter_file);
}

#[test]
fn a_role_that_keter_did_not_create_is_not_taken_over() {
    let pg = shared();
    pg.superuser("postgres")
        .batch_execute("CREATE ROLE squatter LOGIN PASSWORD 'x'")
        .unwrap();
    let k = start_keter("pg-squatter", pg);
    k.deploy_hello("other", "v1", "other.example.com", &[]);
    deploy_pgapp(&k, "squatter", "x", "squatter.example.com");
    let failed = k.wait_deploy_result("squatter", DeployResult::Failed, WAIT);
    assert!(
        failed
            .error
            .as_ref()
            .is_some_and(|e| e.contains("a role named squatter already exists")),
        "{failed:?}"
    );
    assert!(!pg.database_exists("squatter"));
    assert!(!store(&k).exists());
    // Other apps are not affected.
    k.wait_for("other.example.com", "v1", WAIT);
}

#[test]
fn a_bundle_asking_for_postgres_without_a_server_fails_clearly() {
    let k = Keter::start("pg-none");
    deploy_pgapp(&k, "nodb", "x", "nodb.example.com");
    let failed = k.wait_deploy_result("nodb", DeployResult::Failed, WAIT);
    assert!(
        failed
            .error
            .as_ref()
            .is_some_and(|e| e.contains("has no `postgres` section")),
        "{failed:?}"
    );
    assert_eq!(k.get("nodb.example.com", "/").unwrap().status, 404);
}

#[test]
fn server_down_then_up_keeps_the_old_version_then_deploys() {
    let pg = PgCluster::start("downup");
    let k = start_keter("pg-downup", &pg);
    let host = "downup.example.com";
    deploy_pgapp(&k, "downup", "one", host);
    k.wait_for(host, "one", WAIT);

    pg.down();
    deploy_pgapp(&k, "downup", "two", host);
    let failed = k.wait_deploy_result("downup", DeployResult::Failed, WAIT);
    assert!(
        failed.error.as_ref().is_some_and(
            |e| e.contains("postgres plugin: cannot connect to PostgreSQL at 127.0.0.1")
        ),
        "{failed:?}"
    );
    assert!(k.log().contains("the previous version keeps serving"));
    // The old version still answers (its own queries fail while the server is down).
    assert_eq!(k.get(host, "/whoami").unwrap().body.trim(), "downup downup");

    pg.up();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(k.pid()),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    k.wait_for(host, "one,two", WAIT);
}

#[test]
fn a_deploy_that_failed_while_the_server_was_down_is_tried_again_by_itself() {
    let pg = PgCluster::start("retry");
    let k = start_keter("pg-retry", &pg);
    let host = "retry.example.com";
    deploy_pgapp(&k, "retry", "one", host);
    k.wait_for(host, "one", WAIT);

    pg.down();
    deploy_pgapp(&k, "retry", "two", host);
    let failed = k.wait_deploy_result("retry", DeployResult::Failed, WAIT);
    assert!(
        failed
            .error
            .as_ref()
            .is_some_and(|e| e.contains("postgres plugin: cannot connect")),
        "{failed:?}"
    );
    let line = k
        .log()
        .lines()
        .rfind(|l| l.contains("deploy of retry.keter failed"))
        .unwrap()
        .to_string();
    assert!(line.contains("keter tries again in"), "{line}");
    // The status says what failed and that it is tried again.
    let report = crate::status::json(&k, "/api/apps/retry");
    assert_eq!(report["state"], "running", "{report}");
    assert_eq!(report["last_deploy"]["error_kind"], "postgres", "{report}");
    assert!(report["last_deploy"]["retry_at"].is_string(), "{report}");

    // The server comes back; nobody sends SIGHUP or copies the bundle again.
    pg.up();
    k.wait_for(host, "one,two", Duration::from_secs(60));
    assert!(
        k.log()
            .contains("retry: trying the deploy of retry.keter again")
    );
}

#[test]
fn a_half_finished_run_is_finished_by_the_next_deploy() {
    let pg = PgCluster::start("half");
    let k = start_keter("pg-half", &pg);
    let host = "half.example.com";
    // A session on template1 makes CREATE DATABASE fail after CREATE ROLE succeeded.
    let blocker = pg.superuser("template1");
    deploy_pgapp(&k, "half", "one", host);
    let failed = k.wait_deploy_result("half", DeployResult::Failed, WAIT);
    assert!(
        failed
            .error
            .as_ref()
            .is_some_and(|e| e.contains("postgres plugin: CREATE DATABASE half failed")),
        "{failed:?}"
    );
    assert!(pg.role_exists("half"));
    assert!(!pg.database_exists("half"));
    assert!(
        !store(&k).exists(),
        "credentials recorded for a missing database"
    );
    assert_eq!(k.get(host, "/").unwrap().status, 404);

    drop(blocker);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(k.pid()),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    // The left-over role gets the password now recorded, so the app can log in.
    k.wait_for(host, "one", WAIT);
    assert!(
        k.log()
            .contains("left from an earlier deploy that did not finish")
    );
    assert_secret_absent(&k, &recorded_password(&k, "half"));
}

#[test]
fn a_wrong_admin_password_fails_cleanly_and_stays_out_of_the_log() {
    let pg = shared();
    let dir = TempDir::new("pg-wrongpw-secret");
    let wrong = dir.0.join("wrong-password");
    let wrong_password = format!("wrong-{}", random_hex());
    fs::write(&wrong, &wrong_password).unwrap();
    fs::set_permissions(&wrong, fs::Permissions::from_mode(0o600)).unwrap();
    let config = pg.keter_config().replace(
        &pg.password_file.display().to_string(),
        &wrong.display().to_string(),
    );
    let mut k = Keter::start_with(
        "pg-wrongpw",
        Opts {
            readiness_timeout: 20.0,
            extra: config,
            ..Opts::default()
        },
    );
    let host = "wrongpw.example.com";
    deploy_pgapp(&k, "wrongpw", "one", host);
    k.deploy_hello("bystander", "v1", "bystander.example.com", &[]);
    let failed = k.wait_deploy_result("wrongpw", DeployResult::Failed, WAIT);
    assert!(
        failed
            .error
            .as_ref()
            .is_some_and(|e| e.contains("password authentication failed")),
        "{failed:?}"
    );
    k.wait_for("bystander.example.com", "v1", WAIT);
    assert!(!store(&k).exists());
    assert!(!pg.role_exists("wrongpw"));

    // With the right password (read at start), the restarted keter deploys it.
    fs::copy(&pg.password_file, &wrong).unwrap();
    let _ = k.signal_and_wait(nix::sys::signal::Signal::SIGTERM);
    k.launch();
    k.wait_for(host, "one", WAIT);
    assert_secret_absent(&k, &wrong_password);
    assert_secret_absent(&k, &pg.admin_password);
    assert_secret_absent(&k, &recorded_password(&k, "wrongpw"));
}

#[test]
fn a_full_disk_when_credentials_are_written_records_nothing_and_the_next_deploy_finishes() {
    let pg = shared();
    let k = start_keter("pg-disk-full", pg);
    deploy_pgapp(&k, "first", "one", "first.example.com");
    wait_live(&k, "first", "first.example.com", "one", 1);
    let before = fs::read_to_string(store(&k)).unwrap();

    // etc/ on a tiny tmpfs, filled up: the credentials file cannot be rewritten. Mode 0700,
    // as keter keeps etc/ (a tmpfs is 1777 otherwise, and keter refuses to run apps whose
    // users could write it).
    let etc = k.root.join("etc");
    let saved = k.dir.0.join("etc-saved");
    fs::create_dir_all(&saved).unwrap();
    fs::copy(store(&k), saved.join("postgres.yaml")).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs"])
        .arg(&etc)
        .status()
        .is_ok_and(|s| s.success());
    assert!(mounted, "cannot mount a tmpfs (this test runs as root)");
    fs::copy(saved.join("postgres.yaml"), store(&k)).unwrap();
    {
        use std::io::Write;
        let mut filler = fs::File::create(etc.join("filler")).unwrap();
        while filler.write_all(&[7u8; 1024]).is_ok() {}
    }
    deploy_pgapp(&k, "second", "two", "second.example.com");
    k.wait_deploy_result("second", DeployResult::Failed, WAIT);
    let line = k
        .log()
        .lines()
        .rfind(|l| l.contains("second: deploy of second.keter failed"))
        .unwrap()
        .to_string();
    assert!(line.contains("No space left on device"), "{line}");
    // Nothing half-written, nothing recorded for the app that failed.
    assert_eq!(fs::read_to_string(store(&k)).unwrap(), before);
    let leftovers: Vec<_> = fs::read_dir(&etc)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !["postgres.yaml", "filler", "processes", "state"].contains(&n.as_str()))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    assert_eq!(k.get("first.example.com", "/").unwrap().body.trim(), "one");

    // Space again: the next try finishes the job with the role created before.
    fs::remove_file(etc.join("filler")).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(k.pid()),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    wait_live(&k, "second", "second.example.com", "two", 1);
    let after = fs::read_to_string(store(&k)).unwrap();
    assert!(after.contains("second"), "{after}");
    // The apps' users are recorded in the etc/ about to be unmounted: removed while it is
    // there.
    let mut k = k;
    k.signal_and_wait(nix::sys::signal::Signal::SIGTERM);
    remove_app_users(&k.root);
    let _ = std::process::Command::new("umount").arg(&etc).status();
}

/// A session as `app`'s role with the credentials keter recorded for it (what the app gets in
/// its environment), over TCP with its password, on the database `dbname`.
fn connect_as(
    k: &Keter,
    pg: &PgCluster,
    app: &str,
    dbname: &str,
) -> Result<Client, postgres::Error> {
    let text = fs::read_to_string(store(k)).unwrap();
    let tree = keter::yaml::parse(&text).unwrap();
    postgres::Config::new()
        .host("127.0.0.1")
        .port(pg.port)
        .user(tree[app]["user"].as_str().unwrap())
        .password(tree[app]["pass"].as_str().unwrap())
        .dbname(dbname)
        .connect(NoTls)
}

fn assert_refused(result: Result<Client, postgres::Error>, what: &str) {
    match result {
        Ok(_) => panic!("{what}: connected"),
        Err(e) => assert_eq!(
            e.code(),
            Some(&postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
            "{what}: {e:?}"
        ),
    }
}

#[test]
fn an_apps_credentials_do_not_connect_to_another_apps_database() {
    let pg = shared();
    let k = start_keter("pg-neighbours", pg);
    deploy_pgapp(&k, "nba", "a1", "nba.example.com");
    deploy_pgapp(&k, "nbb", "b1", "nbb.example.com");
    wait_live(&k, "nba", "nba.example.com", "a1", 1);
    wait_live(&k, "nbb", "nbb.example.com", "b1", 1);

    // Each role reaches its own database, and only that one.
    connect_as(&k, pg, "nba", "nba").expect("nba's role connects to its own database");
    connect_as(&k, pg, "nbb", "nbb").expect("nbb's role connects to its own database");
    assert_refused(
        connect_as(&k, pg, "nba", "nbb"),
        "nba's role on nbb's database",
    );
    assert_refused(
        connect_as(&k, pg, "nbb", "nba"),
        "nbb's role on nba's database",
    );

    // A database as an earlier keter created it (PUBLIC may connect) is closed on the next
    // deploy of its app.
    pg.superuser("postgres")
        .batch_execute("GRANT CONNECT, TEMPORARY ON DATABASE nbb TO PUBLIC")
        .unwrap();
    connect_as(&k, pg, "nba", "nbb").expect("PUBLIC's grant is back");
    deploy_pgapp(&k, "nbb", "b2", "nbb.example.com");
    wait_live(&k, "nbb", "nbb.example.com", "b1,b2", 2);
    assert_refused(connect_as(&k, pg, "nba", "nbb"), "after the redeploy");
    connect_as(&k, pg, "nbb", "nbb").expect("nbb's role still connects after the redeploy");
    let public_temp: bool = pg
        .superuser("postgres")
        .query_one(
            "SELECT has_database_privilege('public', 'nbb', 'TEMPORARY')",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(
        !public_temp,
        "PUBLIC may still create temporary tables in nbb"
    );
}

#[test]
fn a_database_that_keters_plugin_created_as_the_superuser_is_closed_on_its_next_deploy() {
    let pg = shared();
    // As Keter's plugin left it: role and database made by the superuser, PUBLIC may connect.
    let mut su = pg.superuser("postgres");
    su.batch_execute("CREATE ROLE oldplugin LOGIN PASSWORD 'oldpluginpass'")
        .unwrap();
    // CREATE DATABASE cannot share a statement list (an implicit transaction).
    su.batch_execute("CREATE DATABASE oldplugin OWNER oldplugin")
        .unwrap();
    let k = start_keter("pg-old-plugin", pg);
    fs::write(
        store(&k),
        "oldplugin:\n  name: oldplugin\n  user: oldplugin\n  pass: oldpluginpass\n  server: localhost\n  port: 5432\n",
    )
    .unwrap();
    fs::set_permissions(store(&k), fs::Permissions::from_mode(0o600)).unwrap();
    let host = "oldplugin.example.com";
    deploy_pgapp(&k, "oldplugin", "kept", host);
    wait_live(&k, "oldplugin", host, "kept", 1);
    let open: bool = su
        .query_one(
            "SELECT has_database_privilege('public', 'oldplugin', 'CONNECT')",
            &[],
        )
        .unwrap()
        .get(0);
    let version: i32 = su
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .unwrap()
        .get(0);
    if version < 160000 {
        // keter's admin (CREATEROLE) makes itself a member of the role, then closes it.
        assert!(!open, "PUBLIC may still connect:\n{}", k.log());
    } else {
        // Since PostgreSQL 16 it cannot join a role it did not create: it says what to run.
        assert!(open);
        assert!(
            k.log()
                .contains("REVOKE CONNECT, TEMPORARY ON DATABASE \"oldplugin\" FROM PUBLIC")
        );
    }
    connect_as(&k, pg, "oldplugin", "oldplugin").expect("the app's role still connects");
}

/// The fake server built by `cargo test` (`examples/pgsquat.rs`).
fn pgsquat_binary() -> PathBuf {
    let path = pgapp_binary().with_file_name("pgsquat");
    assert!(
        path.exists(),
        "{} is missing: run `cargo test`",
        path.display()
    );
    path
}

/// Deploys `pgsquat ARGS` as the app `squat` (a process with that app's own user, as any
/// hostile bundle gets) and waits until it answers.
fn deploy_squatter(k: &Keter, args: &[&str]) {
    let yaml = format!(
        "stanzas:\n  - type: webapp\n    exec: ../dist/pgsquat\n    args: {args:?}\n    host: squat.example.com\n"
    );
    let path = k.dir.0.join("squat.keter");
    BundleBuilder::new()
        .file("dist/pgsquat", fs::read(pgsquat_binary()).unwrap(), 0o755)
        .file("config/keter.yaml", yaml.into_bytes(), 0o644)
        .write(&path);
    k.deploy("squat", &path);
    k.wait_for("squat.example.com", "connections 0", WAIT);
}

/// The pid and uid of the first process of `app`, from the status API and `/proc`.
fn process_of(k: &Keter, app: &str) -> (i32, u32) {
    use std::os::unix::fs::MetadataExt;
    let report = crate::status::json(k, &format!("/api/apps/{app}"));
    let pid = report["processes"][0]["pid"]
        .as_i64()
        .unwrap_or_else(|| panic!("{report}")) as i32;
    (pid, fs::metadata(format!("/proc/{pid}")).unwrap().uid())
}

/// A keter whose postgres section points at `host` and `port` where no PostgreSQL runs, with
/// an admin password of its own; returns it with that password.
fn start_keter_on_squatted_server(label: &str, host: &str, port: u16) -> (Keter, String) {
    let secret = TempDir::new(&format!("{label}-secret"));
    let password = format!("admin-{}", random_hex());
    let file = secret.0.join("admin-password");
    fs::write(&file, format!("{password}\n")).unwrap();
    fs::set_permissions(&file, fs::Permissions::from_mode(0o600)).unwrap();
    let k = Keter::start_with(
        label,
        Opts {
            readiness_timeout: 20.0,
            extra: format!(
                "postgres:\n  host: {host}\n  port: {port}\n  user: {ADMIN}\n  password-file: {}\n",
                file.display()
            ),
            ..Opts::default()
        },
    );
    // keter read the password at start; the file may go.
    drop(secret);
    (k, password)
}

/// Deploys a bystander and a postgres app `victim`, and waits for the victim's deploy and its
/// automatic retry to fail. Returns the last failure's log line.
fn deploy_victim_and_wait_for_its_retry(k: &Keter) -> String {
    k.deploy_hello("bystander", "v1", "bystander.example.com", &[]);
    k.wait_for("bystander.example.com", "v1", WAIT);
    deploy_pgapp(k, "victim", "one", "victim.example.com");
    let failed = "victim: deploy of victim.keter failed";
    let first = k.wait_deploy_result("victim", DeployResult::Failed, WAIT);
    k.wait_next_deploy(
        "victim",
        Some(&first),
        DeployResult::Failed,
        Duration::from_secs(60),
    );
    assert!(
        k.log()
            .contains("victim: trying the deploy of victim.keter again"),
        "{}",
        k.log()
    );
    k.log()
        .lines()
        .rfind(|l| l.contains(failed))
        .unwrap()
        .to_string()
}

/// What the squatter saw, checked: no password (above all not keter's), no connection.
fn assert_squatter_got_nothing(k: &Keter, admin_password: &str) {
    let seen = k.get("squat.example.com", "/").unwrap().body;
    assert!(
        !seen.contains(admin_password),
        "the squatter received keter's admin password:\n{seen}"
    );
    assert!(
        !seen.contains("received"),
        "the squatter received a password:\n{seen}"
    );
    assert_eq!(
        seen.trim(),
        "connections 0",
        "keter connected to the squatter"
    );
}

#[test]
fn an_app_holding_the_servers_port_while_it_is_down_gets_no_password() {
    // No PostgreSQL on this port: an app takes it, as it could while the server restarts.
    let port = free_port();
    let (k, admin_password) = start_keter_on_squatted_server("pg-squat-tcp", "127.0.0.1", port);
    deploy_squatter(&k, &["--tcp", &format!("127.0.0.1:{port}")]);
    let (squatter_pid, squatter_uid) = process_of(&k, "squat");
    assert!((65536..=99999).contains(&squatter_uid), "{squatter_uid}");

    let line = deploy_victim_and_wait_for_its_retry(&k);
    assert_squatter_got_nothing(&k, &admin_password);

    // The log says who holds the port: the app's user, its pid and its command.
    let user = nix::unistd::User::from_uid(squatter_uid.into())
        .unwrap()
        .unwrap();
    for needle in [
        "postgres plugin: keter does not log in to PostgreSQL at 127.0.0.1",
        &format!("uid {squatter_uid} ({})", user.name),
        &format!("pid {squatter_pid} ("),
        "pgsquat --tcp",
        "only root and the server's user postgres",
        "keter tries again in",
    ] {
        assert!(line.contains(needle), "{needle:?} is not in: {line}");
    }
    let report = crate::status::json(&k, "/api/apps/victim");
    assert_eq!(report["last_deploy"]["error_kind"], "postgres", "{report}");
    assert!(report["last_deploy"]["retry_at"].is_string(), "{report}");
    assert_eq!(k.get("victim.example.com", "/").unwrap().status, 404);
    assert_eq!(
        k.get("bystander.example.com", "/").unwrap().body.trim(),
        "v1"
    );
    assert_secret_absent(&k, &admin_password);
}

#[test]
fn a_socket_planted_in_a_socket_folder_apps_may_write_gets_no_password() {
    // keter's postgres section names a socket folder every user may write: an app plants
    // the server's socket in it.
    let folder = TempDir::new("pg-squat-unix-folder");
    fs::set_permissions(&folder.0, fs::Permissions::from_mode(0o777)).unwrap();
    let port = 5432;
    let (k, admin_password) =
        start_keter_on_squatted_server("pg-squat-unix", &folder.0.display().to_string(), port);
    let socket = folder.0.join(format!(".s.PGSQL.{port}"));
    deploy_squatter(&k, &["--unix", &socket.display().to_string()]);
    let (squatter_pid, squatter_uid) = process_of(&k, "squat");
    assert!((65536..=99999).contains(&squatter_uid), "{squatter_uid}");

    let line = deploy_victim_and_wait_for_its_retry(&k);
    assert_squatter_got_nothing(&k, &admin_password);
    for needle in [
        "postgres plugin: keter does not log in to PostgreSQL at socket folder",
        "(mode 0777, owner uid 0 (root)",
        "may be written by users other than root and the server's user postgres",
        &format!(
            "the socket {} belongs to uid {squatter_uid}",
            socket.display()
        ),
        &format!("pid {squatter_pid} ("),
        "keter tries again in",
    ] {
        assert!(line.contains(needle), "{needle:?} is not in: {line}");
    }
    assert_eq!(
        k.get("bystander.example.com", "/").unwrap().body.trim(),
        "v1"
    );
    assert_secret_absent(&k, &admin_password);
}

/// The environment of `app`'s first process.
fn environment_of(k: &Keter, app: &str) -> std::collections::BTreeMap<String, String> {
    let (pid, _) = process_of(k, app);
    fs::read(format!("/proc/{pid}/environ"))
        .unwrap()
        .split(|b| *b == 0)
        .filter_map(|kv| {
            let kv = String::from_utf8_lossy(kv);
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect()
}

#[test]
fn an_app_is_given_the_servers_socket_folder_and_connects_through_it() {
    let pg = shared();
    let k = start_keter("pg-socket", pg);
    let host = "sockapp.example.com";
    deploy_pgapp(&k, "sockapp", "one", host);
    wait_live(&k, "sockapp", host, "one", 1);
    // pgapp connected with the PG* variables and with DATABASE_URL (it checks both name the
    // same session); the server sees the first over its socket.
    assert_eq!(k.get(host, "/via").unwrap().body.trim(), "socket");
    let env = environment_of(&k, "sockapp");
    let folder = pg.socket_folder().display().to_string();
    assert_eq!(env["PGHOST"], folder);
    assert_eq!(env["PGPORT"], pg.port.to_string());
    let password = recorded_password(&k, "sockapp");
    assert_eq!(
        env["DATABASE_URL"],
        format!(
            "postgresql://sockapp:{password}@/sockapp?host={folder}&port={}",
            pg.port
        )
    );
    assert!(!k.log().contains("sockapp: the app"), "{}", k.log());
    // keter still records the server as configured.
    let tree = keter::yaml::parse(&fs::read_to_string(store(&k)).unwrap()).unwrap();
    assert_eq!(tree["sockapp"]["server"], "127.0.0.1");
}

#[test]
fn an_app_whose_role_cannot_log_in_over_the_socket_gets_tcp_and_one_warning() {
    // Debian's default: peer authentication on the socket, passwords over TCP.
    let pg = PgCluster::start_with_hba(
        "peer",
        "local all postgres trust\nlocal all all peer\nhost all all 127.0.0.1/32 scram-sha-256\n",
    );
    let k = start_keter("pg-peer", &pg);
    let host = "peerapp.example.com";
    deploy_pgapp(&k, "peerapp", "one", host);
    wait_live(&k, "peerapp", host, "one", 1);
    assert_eq!(k.get(host, "/via").unwrap().body.trim(), "tcp 127.0.0.1");
    let env = environment_of(&k, "peerapp");
    assert_eq!(env["PGHOST"], "127.0.0.1");
    let warning =
        "peerapp: the app's role peerapp cannot log in with its password over the socket in";
    let line = k
        .log()
        .lines()
        .find(|l| l.contains(warning))
        .unwrap_or_else(|| panic!("no warning:\n{}", k.log()))
        .to_string();
    for needle in [
        "Peer authentication failed",
        "the app is given TCP (127.0.0.1:",
        "add the line `local peerapp peerapp scram-sha-256` to",
        "data/pg_hba.conf above the line `local all all peer`",
    ] {
        assert!(line.contains(needle), "{needle:?} is not in: {line}");
    }
    // Once per app and run: a redeploy says nothing more.
    deploy_pgapp(&k, "peerapp", "two", host);
    wait_live(&k, "peerapp", host, "one,two", 2);
    assert_eq!(k.log_count(warning), 1, "{}", k.log());

    // An admin role that may not read the server's settings cannot learn its socket folder.
    pg.superuser("postgres")
        .batch_execute(&format!("REVOKE pg_read_all_settings FROM {ADMIN}"))
        .unwrap();
    deploy_pgapp(&k, "nosettings", "one", "nosettings.example.com");
    wait_live(&k, "nosettings", "nosettings.example.com", "one", 1);
    k.wait_log(
        &format!("run `GRANT pg_read_all_settings TO {ADMIN}` as a superuser"),
        WAIT,
    );
}
