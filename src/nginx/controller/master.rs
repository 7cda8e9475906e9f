//! The managed Nginx master (`nginx.mode: managed`): started as a child of keter, taken over
//! when an earlier keter left it running (an in-place upgrade, or a keter that was killed),
//! watched, restarted with backoff when it dies, stopped at shutdown. Part of the controller
//! (`controller.rs`), which alone signals Nginx.

use std::fs;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{Controller, Msg, NginxError};
use crate::config::NginxMode;
use crate::nginx::system;
use crate::{process, procfs};

/// The running managed master.
pub(super) struct Master {
    pub pid: i32,
    pub started: Instant,
}

impl Controller {
    /// Takes over the managed master an earlier keter left running (an in-place upgrade, or a
    /// keter that was killed): it goes on serving. A master that is gone may have left its
    /// workers, which hold the listening sockets: they are stopped. True when a master was
    /// taken over.
    pub(super) fn adopt_master(&mut self) -> bool {
        let pid_file = self.paths.prefix.join("nginx.pid");
        let Some(pid) = fs::read_to_string(&pid_file)
            .ok()
            .and_then(|t| t.trim().parse::<i32>().ok())
            .filter(|p| *p > 0)
        else {
            return false;
        };
        let prefix = self.paths.prefix.to_string_lossy().into_owned();
        let ours = |pid: i32| {
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            cmdline.starts_with("nginx: master process") && cmdline.contains(&prefix)
        };
        // The pidfd first, then the check: once it is open the pid names this process.
        let pidfd = crate::childwatch::pidfd_open(pid);
        match pidfd {
            Ok(pidfd) if ours(pid) && procfs::is_alive(pid) => {
                if let Err(e) = self.watch_master_fd(pid, pidfd) {
                    log::error!("nginx: {e}; stopping the master (pid {pid}) left running");
                    process::stop_group(pid, self.stop_timeout);
                    return false;
                }
                let age = procfs::age(pid).unwrap_or_default();
                self.master = Some(Master {
                    pid,
                    started: Instant::now().checked_sub(age).unwrap_or_else(Instant::now),
                });
                self.master_pid.store(pid, Ordering::Relaxed);
                log::info!("nginx: took over the master, pid {pid}");
                true
            }
            Ok(_) => false,
            Err(_) => {
                // Gone: its workers, in its process group, would keep the ports.
                let orphans = procfs::group_members(pid).into_iter().any(|w| {
                    fs::read(format!("/proc/{w}/cmdline"))
                        .is_ok_and(|c| c.starts_with(b"nginx: worker process"))
                });
                if orphans {
                    log::warn!("nginx: stopping the workers of the master (pid {pid}) that died");
                    process::stop_group(pid, self.stop_timeout);
                }
                false
            }
        }
    }

    /// The master whose workers must answer: ours in managed mode, the pid file's in system mode.
    pub(super) fn current_master(&self) -> Option<i32> {
        match self.nginx.mode {
            NginxMode::Managed => self.master.as_ref().map(|m| m.pid),
            NginxMode::System => system::master_pid(&self.nginx.pid_file).ok(),
        }
    }

    pub(super) fn start_master(&mut self) -> Result<(), NginxError> {
        // A master that was killed leaves its socket file behind, and Nginx will not bind over
        // it. The file is keter's own.
        let _ = fs::remove_file(&self.paths.control_socket);
        let mut cmd = process::command_in_new_group(&self.nginx.binary);
        cmd.args(["-e", "stderr", "-p"])
            .arg(&self.paths.prefix)
            .arg("-c")
            .arg(&self.paths.main_conf)
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null());
        let child = cmd.spawn().map_err(|e| {
            NginxError::Unconfirmed(format!("cannot start {}: {e}", self.nginx.binary.display()))
        })?;
        let pid = child.id() as i32;
        // Reaped by the watch thread, by pid.
        drop(child);
        self.watch_master(pid).inspect_err(|_| {
            process::stop_group(pid, Duration::ZERO);
            crate::childwatch::reap(pid);
        })?;
        log::info!("nginx: started the master, pid {pid}");
        self.master = Some(Master {
            pid,
            started: Instant::now(),
        });
        self.master_pid.store(pid, Ordering::Relaxed);
        self.restart_at = None;
        Ok(())
    }

    /// Has the watch thread report the master's exit to the controller.
    pub(super) fn watch_master(&self, pid: i32) -> Result<(), NginxError> {
        crate::childwatch::pidfd_open(pid)
            .map_err(|e| NginxError::Unconfirmed(format!("cannot watch the Nginx master: {e}")))
            .and_then(|pidfd| self.watch_master_fd(pid, pidfd))
    }

    pub(super) fn watch_master_fd(
        &self,
        pid: i32,
        pidfd: std::os::fd::OwnedFd,
    ) -> Result<(), NginxError> {
        let tx = self.tx.clone();
        crate::childwatch::exit(
            pid,
            pidfd,
            Box::new(move |pid, status| {
                let _ = tx.send(Msg::Exited { pid, status });
            }),
        )
        .map_err(|e| NginxError::Unconfirmed(format!("cannot watch the Nginx master: {e}")))
    }

    pub(super) fn exited(&mut self, pid: i32, status: Option<ExitStatus>) {
        let Some(m) = &self.master else { return };
        if m.pid != pid {
            return;
        }
        let ran = m.started.elapsed();
        self.master = None;
        self.master_pid.store(0, Ordering::Relaxed);
        // Its workers outlive it and keep the listening sockets: stop the whole group.
        process::stop_group(pid, Duration::from_secs(2));
        let delay = self.restart.failed(ran);
        log::error!(
            "nginx: the master (pid {pid}) stopped with {}; restarting it in {delay:?}",
            process::describe_exit(status),
        );
        self.restart_at = Some(Instant::now() + delay);
    }

    pub(super) fn restart_master(&mut self) {
        self.restart_at = None;
        let result = self.start_master().and_then(|()| self.confirm());
        if let Err(e) = result {
            log::error!("nginx: restart failed: {e}");
            self.master_pid.store(0, Ordering::Relaxed);
            if let Some(m) = self.master.take() {
                process::stop_group(m.pid, Duration::from_secs(1));
            }
            self.restart_at = Some(Instant::now() + self.restart.failed(Duration::ZERO));
        }
    }

    pub(super) fn stop_master(&mut self) {
        if self.nginx.mode == NginxMode::System {
            self.leave_system_nginx();
            return;
        }
        self.master_pid.store(0, Ordering::Relaxed);
        if let Some(m) = self.master.take() {
            log::info!("nginx: stopping the master (pid {})", m.pid);
            process::stop_group(m.pid, self.stop_timeout);
        }
        let _ = fs::remove_file(&self.paths.control_socket);
    }
}
