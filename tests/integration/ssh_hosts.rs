//! Hosts for `keter deploy` on this one machine: each host is a network namespace of its own
//! (`ip netns`), reached from the test over a veth pair at an address of its own, with its own
//! OpenSSH server listening in it and its own keter (own root, own managed Nginx, own ports; a
//! keter started by the harness in `support.rs`). The namespaces share the filesystem, so the
//! keter that `ssh` runs on a host is the binary cargo built, and the status socket of each
//! host's keter is a file in that host's test folder. Each host's sshd runs in a mount
//! namespace of its own where that host's keter configuration is mounted on one path,
//! [`Hosts::config`], as every host of a real rollout has its own at the same path.
//!
//! The test talks to the hosts the way an operator does: `ssh` with a configuration of the
//! test's own (`KETER_SSH_COMMAND`), a key it generated and root as the remote user.

#![allow(dead_code)]

use std::fs;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::support::{Keter, Opts, TempDir};

const SSHD: &str = "/usr/sbin/sshd";

/// One host: a namespace, its sshd (none for a host that is down) and its keter.
pub struct SshHost {
    /// What `keter deploy --hosts` names it: `root@ADDRESS`.
    pub destination: String,
    pub address: String,
    pub keter: Option<Keter>,
    netns: String,
    sshd: Option<Child>,
}

impl SshHost {
    pub fn keter(&self) -> &Keter {
        self.keter
            .as_ref()
            .expect("a host that is down has no keter")
    }
}

impl Drop for SshHost {
    fn drop(&mut self) {
        if let Some(mut c) = self.sshd.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Deleting the namespace deletes its end of the veth pair, and with it the pair.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .stderr(Stdio::null())
            .status();
    }
}

/// Hosts, their SSH client configuration and key.
pub struct Hosts {
    /// Dropped first: sshd stopped and namespaces deleted before the folder goes.
    pub hosts: Vec<SshHost>,
    pub dir: TempDir,
    ssh_config: PathBuf,
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Fails with a clear message when the OpenSSH server is missing: tests never pass by skipping.
pub fn require_sshd() {
    assert!(
        Path::new(SSHD).exists(),
        "{SSHD} is missing: run `apt-get install -y openssh-server` (scripts/test does)"
    );
}

impl Hosts {
    /// `up` hosts with sshd and keter, each keter started with `opts()`.
    pub fn start(label: &str, up: usize, opts: impl Fn() -> Opts) -> Hosts {
        require_sshd();
        let dir = TempDir::new(label);
        let keygen = |file: &Path| {
            run(Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(file));
        };
        keygen(&dir.0.join("host_key"));
        keygen(&dir.0.join("user_key"));
        fs::copy(dir.0.join("user_key.pub"), dir.0.join("authorized_keys")).unwrap();
        let keter_dir = Path::new(env!("CARGO_BIN_EXE_keter")).parent().unwrap();
        fs::write(
            dir.0.join("sshd_config"),
            format!(
                "HostKey {d}/host_key\nAuthorizedKeysFile {d}/authorized_keys\n\
                 PermitRootLogin prohibit-password\nPasswordAuthentication no\nStrictModes no\n\
                 UsePAM no\nPidFile none\nSetEnv PATH={k}:/usr/sbin:/usr/bin:/sbin:/bin\n",
                d = dir.0.display(),
                k = keter_dir.display()
            ),
        )
        .unwrap();
        let ssh_config = dir.0.join("ssh_config");
        fs::write(
            &ssh_config,
            format!(
                "Host *\n  IdentityFile {}/user_key\n  IdentitiesOnly yes\n  \
                 UserKnownHostsFile /dev/null\n  StrictHostKeyChecking no\n  LogLevel ERROR\n  \
                 ConnectTimeout 5\n",
                dir.0.display()
            ),
        )
        .unwrap();
        fs::create_dir_all("/run/sshd").unwrap();
        fs::write(
            dir.0.join("keter-config.yaml"),
            "# each host's sshd sees its own keter's configuration mounted here\n",
        )
        .unwrap();
        let mut hosts = Hosts {
            dir,
            hosts: Vec::new(),
            ssh_config,
        };
        for _ in 0..up {
            hosts.add(true, &opts);
        }
        hosts
    }

    /// Adds a host: a namespace with an address, and (when `up`) its sshd and keter.
    pub fn add(&mut self, up: bool, opts: impl Fn() -> Opts) -> usize {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed) % 250;
        let pid = std::process::id();
        let netns = format!("kd{pid}-{n}");
        let (outer, inner) = (format!("kd{pid}-{n}a"), format!("kd{pid}-{n}b"));
        let net = format!("10.{}.{n}", 100 + pid % 150);
        let address = format!("{net}.2");
        run(Command::new("ip").args(["netns", "add", &netns]));
        let mut host = SshHost {
            destination: format!("root@{address}"),
            address: address.clone(),
            keter: None,
            netns: netns.clone(),
            sshd: None,
        };
        run(Command::new("ip").args([
            "link", "add", &outer, "type", "veth", "peer", "name", &inner, "netns", &netns,
        ]));
        run(Command::new("ip").args(["addr", "add", &format!("{net}.1/30"), "dev", &outer]));
        run(Command::new("ip").args(["link", "set", &outer, "up"]));
        let in_ns = |args: &[&str]| {
            run(Command::new("ip")
                .args(["netns", "exec", &netns])
                .args(args));
        };
        in_ns(&["ip", "addr", "add", &format!("{address}/30"), "dev", &inner]);
        in_ns(&["ip", "link", "set", &inner, "up"]);
        in_ns(&["ip", "link", "set", "lo", "up"]);
        if up {
            let keter = Keter::start_with(&format!("host{n}"), opts());
            let log = fs::File::create(self.dir.0.join(format!("sshd-{n}.log"))).unwrap();
            let sshd = Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &netns,
                    "unshare",
                    "-m",
                    "--propagation",
                    "private",
                ])
                .args([
                    "sh",
                    "-c",
                    "mount --bind \"$1\" \"$2\" && shift 2 && exec \"$@\"",
                    "sh",
                ])
                .arg(&keter.config_path)
                .arg(self.config())
                .args([SSHD, "-D", "-e", "-f"])
                .arg(self.dir.0.join("sshd_config"))
                .args(["-o", &format!("ListenAddress={address}:22")])
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap();
            host.sshd = Some(sshd);
            let at: SocketAddr = format!("{address}:22").parse().unwrap();
            let start = Instant::now();
            while TcpStream::connect_timeout(&at, Duration::from_millis(200)).is_err() {
                assert!(
                    start.elapsed() < Duration::from_secs(10),
                    "sshd did not listen on {at}"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            host.keter = Some(keter);
        }
        self.hosts.push(host);
        self.hosts.len() - 1
    }

    /// `--hosts` for these hosts (by index).
    pub fn list(&self, which: &[usize]) -> String {
        which
            .iter()
            .map(|i| self.hosts[*i].destination.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The path of every host's keter configuration, as its sshd sees it (`keter deploy -c`).
    pub fn config(&self) -> PathBuf {
        self.dir.0.join("keter-config.yaml")
    }

    pub fn ssh_command(&self) -> String {
        format!("ssh -F {}", self.ssh_config.display())
    }

    /// Runs `keter deploy ARGS` as an operator would; returns (exit code, stdout, stderr).
    pub fn deploy(&self, args: &[&str]) -> (i32, String, String) {
        self.keter("deploy", args)
    }

    /// Runs `keter rollback ARGS` (with `--hosts` among them) as an operator would; returns
    /// (exit code, stdout, stderr).
    pub fn rollback(&self, args: &[&str]) -> (i32, String, String) {
        self.keter("rollback", args)
    }

    fn keter(&self, command: &str, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_keter"))
            .arg(command)
            .args(args)
            .env("KETER_SSH_COMMAND", self.ssh_command())
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}
