//! What the postgres plugin's listener checks cost (README, "Measured"), each beside its
//! baseline: a checked connection (sock_diag lookups before and after a TCP connect; the
//! socket folder walk, the socket's owner and SO_PEERCRED for a unix socket) against a plain
//! connect; and a whole provision of a recorded app (what every redeploy does) when its role
//! logs in over the socket to get it, against a server whose `pg_hba.conf` refuses that
//! login at once (the app then gets TCP).
//!
//! Run: `cargo bench --bench postgres` as root (release build; needs the PostgreSQL server
//! package, run through `runuser -u postgres`; about 20 seconds).

use std::fs;
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use keter::names::AppName;
use keter::postgres::listener::{self, Trust};
use keter::postgres::{PostgresAdmin, Provisioner, Secret, Server};

const CONNECTS: usize = 2000;
const PROVISIONS: usize = 40;
const TIMEOUT: Duration = Duration::from_secs(5);

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn timed<T>(f: impl FnOnce() -> T) -> Duration {
    let start = Instant::now();
    std::hint::black_box(f());
    start.elapsed()
}

fn main() {
    let me = nix::unistd::geteuid().as_raw().to_string();
    // This process plays the server: its own user is the server's user.
    let trust = Trust::resolve(&me);
    let base = std::env::temp_dir().join(format!("keter-bench-pg-{}", std::process::id()));
    let _ = fs::remove_dir_all(&base);
    fs::create_dir_all(&base).unwrap();
    fs::set_permissions(&base, fs::Permissions::from_mode(0o755)).unwrap();

    let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = tcp.local_addr().unwrap().port();
    let server = Server::new("127.0.0.1", port).unwrap();
    let accept = std::thread::spawn(move || for _ in tcp.incoming() {});
    let (mut plain, mut checked) = (Vec::new(), Vec::new());
    for _ in 0..CONNECTS {
        plain.push(timed(|| TcpStream::connect(("127.0.0.1", port)).unwrap()));
        checked.push(timed(|| listener::open(&server, &trust, TIMEOUT).unwrap()));
    }
    let (plain, checked) = (median(plain), median(checked));
    println!(
        "TCP connect to 127.0.0.1, median of {CONNECTS}: plain {:.0} us, checked {:.0} us (+{:.0} us)",
        us(plain),
        us(checked),
        us(checked.saturating_sub(plain))
    );
    drop(accept);

    let folder = base.join("sockets");
    fs::create_dir_all(&folder).unwrap();
    fs::set_permissions(&folder, fs::Permissions::from_mode(0o755)).unwrap();
    let socket = folder.join(".s.PGSQL.5432");
    let unix = UnixListener::bind(&socket).unwrap();
    std::thread::spawn(move || for _ in unix.incoming() {});
    let server = Server::new(folder.to_str().unwrap(), 5432).unwrap();
    let (mut plain, mut checked) = (Vec::new(), Vec::new());
    for _ in 0..CONNECTS {
        plain.push(timed(|| UnixStream::connect(&socket).unwrap()));
        checked.push(timed(|| listener::open(&server, &trust, TIMEOUT).unwrap()));
    }
    let (plain, checked) = (median(plain), median(checked));
    println!(
        "unix socket connect in {}, median of {CONNECTS}: plain {:.0} us, checked {:.0} us (+{:.0} us)",
        folder.display(),
        us(plain),
        us(checked),
        us(checked.saturating_sub(plain))
    );

    let with_socket = provision_time(&base, "socket", "local all all scram-sha-256\n");
    let without = provision_time(&base, "reject", "local all all reject\n");
    println!(
        "provision of a recorded app, median of {PROVISIONS}: {:.1} ms when the app gets the socket folder (its login there tested), {:.1} ms when the server refuses that login at once (the app gets TCP)",
        with_socket.as_secs_f64() * 1e3,
        without.as_secs_f64() * 1e3
    );
    let _ = fs::remove_dir_all(&base);
}

/// A throwaway cluster in `dir` with `local` lines for every role but `postgres` (whose socket
/// logins are trusted, for the setup): the median time of provisioning one recorded app.
fn provision_time(base: &Path, label: &str, local: &str) -> Duration {
    let cluster = Cluster::start(&base.join(label), local);
    let root = base.join(format!("{label}-root"));
    fs::create_dir_all(root.join("etc")).unwrap();
    let admin = PostgresAdmin {
        server: Server::new("127.0.0.1", cluster.port).unwrap(),
        user: "keter_admin".into(),
        password: Some(Secret::new("bench-admin-password".into())),
        database: "postgres".into(),
        server_user: "postgres".into(),
    };
    let provisioner = Provisioner::new(admin, &root);
    let app = AppName::new("benchapp").unwrap();
    provisioner.provision(&app).unwrap();
    let times = (0..PROVISIONS)
        .map(|_| timed(|| provisioner.provision(&app).unwrap()))
        .collect();
    median(times)
}

/// A PostgreSQL cluster run by the postgres user, stopped and removed on drop.
struct Cluster {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
}

impl Cluster {
    fn start(dir: &Path, local: &str) -> Cluster {
        let bin = fs::read_dir("/usr/lib/postgresql")
            .expect("the PostgreSQL server is not installed (apt-get install postgresql)")
            .flatten()
            .map(|e| e.path().join("bin"))
            .filter(|b| b.join("initdb").exists())
            .max()
            .expect("no /usr/lib/postgresql/*/bin/initdb");
        fs::create_dir_all(dir).unwrap();
        let pg = nix::unistd::User::from_name("postgres").unwrap().unwrap();
        std::os::unix::fs::chown(dir, Some(pg.uid.as_raw()), Some(pg.gid.as_raw())).unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let c = Cluster {
            dir: dir.to_path_buf(),
            bin,
            port,
        };
        let data = dir.join("data").display().to_string();
        c.run(
            "initdb",
            &[
                "-D",
                &data,
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
        fs::write(
            dir.join("data/pg_hba.conf"),
            format!("local all postgres trust\n{local}host all all 127.0.0.1/32 scram-sha-256\n"),
        )
        .unwrap();
        let options = format!(
            "-c listen_addresses=127.0.0.1 -p {port} -k {} -c fsync=off",
            dir.display()
        );
        let log = dir.join("pg.log").display().to_string();
        c.run(
            "pg_ctl",
            &["-D", &data, "-l", &log, "-w", "-o", &options, "start"],
        );
        let hash = postgres_protocol::password::scram_sha_256(b"bench-admin-password");
        c.run(
            "psql",
            &[
                "-h",
                &dir.display().to_string(),
                "-p",
                &port.to_string(),
                "-U",
                "postgres",
                "-qc",
                &format!("CREATE ROLE keter_admin LOGIN CREATEROLE CREATEDB PASSWORD '{hash}'; GRANT pg_read_all_settings TO keter_admin"),
            ],
        );
        c
    }

    fn run(&self, program: &str, args: &[&str]) {
        let status = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join(program))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "{program} failed");
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let data = self.dir.join("data").display().to_string();
        self.run("pg_ctl", &["-D", &data, "-m", "immediate", "-w", "stop"]);
        let _ = fs::remove_dir_all(&self.dir);
    }
}
