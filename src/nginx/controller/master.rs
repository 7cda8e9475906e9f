//! The managed Nginx master (`nginx.mode: managed`) as a process: started as a child of keter,
//! taken over when an earlier keter left it running (an in-place upgrade, or a keter that was
//! killed), and watched, so that its exit comes back to the controller as `Msg::Exited`. When
//! to start, replace and restart it is the planner's (`plan.rs`).

use std::fs;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use super::world::World;
use super::{Msg, NginxError, Unconfirmed};
use crate::{process, procfs};

impl World {
    /// Takes over the managed master an earlier keter left running: it goes on serving. A
    /// master that is gone may have left its workers, which hold the listening sockets: they
    /// are stopped. Its pid and age when one was taken over.
    pub(super) fn adopt(&mut self) -> Option<(i32, Duration)> {
        let pid_file = self.paths.prefix.join("nginx.pid");
        let pid = fs::read_to_string(&pid_file)
            .ok()
            .and_then(|t| t.trim().parse::<i32>().ok())
            .filter(|p| *p > 0)?;
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
                    return None;
                }
                Some((pid, procfs::age(pid).unwrap_or_default()))
            }
            Ok(_) => None,
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
                None
            }
        }
    }

    /// Starts a master on the files in place and watches it.
    pub(super) fn spawn_master(&mut self) -> Result<i32, NginxError> {
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
        let child = cmd.spawn().map_err(|e| Unconfirmed::Start {
            binary: self.nginx.binary.clone(),
            source: Arc::new(e),
        })?;
        let pid = child.id() as i32;
        // Reaped by the watch thread, by pid.
        drop(child);
        let watched = crate::childwatch::pidfd_open(pid)
            .map_err(|e| Unconfirmed::Watch(Arc::new(e)).into())
            .and_then(|pidfd| self.watch_master_fd(pid, pidfd));
        if let Err(e) = watched {
            process::stop_group(pid, Duration::ZERO);
            crate::childwatch::reap(pid);
            return Err(e);
        }
        Ok(pid)
    }

    /// Has the watch thread report the master's exit to the controller.
    fn watch_master_fd(&self, pid: i32, pidfd: std::os::fd::OwnedFd) -> Result<(), NginxError> {
        let tx = self.tx.clone();
        crate::childwatch::exit(
            pid,
            pidfd,
            Box::new(move |pid, status| {
                let _ = tx.send(Msg::Exited { pid, status });
            }),
        )
        .map_err(|e| Unconfirmed::Watch(Arc::new(e)).into())
    }
}
