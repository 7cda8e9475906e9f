//! What keter tells systemd, and keeps with it (`sd_notify`):
//!
//! * `READY=1` once keter watches `incoming/` (the unit is `Type=notify`, so `systemctl start`
//!   returns when keter serves), `RELOADING=1` when an in-place upgrade begins and `READY=1`
//!   again from the new image, `STOPPING=1` at shutdown;
//! * the apps' output pipes, in systemd's file descriptor store (`FDSTORE=1`), so that a pipe
//!   outlives even the app: after a crash, the lines an app printed before it ended, while no
//!   keter ran, are read from the pipe systemd gives back (`LISTEN_FDS`). A pipe whose app
//!   still runs is found again without it (`src/procfs.rs`, `open_pipe_of_group`); the store
//!   adds the last words of an app that ended meanwhile.
//!
//! Without systemd (`NOTIFY_SOCKET` unset) nothing is sent; the store is used only when the
//! unit allows it (`FileDescriptorStoreMax=`, which the unit passes on as `KETER_FD_STORE`
//! for systemd before version 254, which does not say it otherwise).

use std::collections::HashMap;
use std::fs::File;
use std::io::IoSlice;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::OnceLock;

use nix::sys::socket::{ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr};

/// The first descriptor systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;

/// Sends `state` (`KEY=VALUE` lines), with `fds`, to systemd's notification socket, if there
/// is one. Best effort: a failure is logged at debug level only.
fn send(state: &str, fds: &[RawFd]) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = (|| -> nix::Result<()> {
        let bytes = path.as_encoded_bytes();
        let addr = match bytes.strip_prefix(b"@") {
            // An abstract socket.
            Some(name) => UnixAddr::new_abstract(name)?,
            None => UnixAddr::new(bytes)?,
        };
        let socket = nix::sys::socket::socket(
            nix::sys::socket::AddressFamily::Unix,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        let iov = [IoSlice::new(state.as_bytes())];
        let rights = [ControlMessage::ScmRights(fds)];
        let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
        nix::sys::socket::sendmsg(
            socket.as_raw_fd(),
            &iov,
            cmsgs,
            MsgFlags::empty(),
            Some(&addr),
        )?;
        Ok(())
    })();
    if let Err(e) = sent {
        log::debug!("cannot notify systemd ({}): {e}", state.replace('\n', " "));
    }
}

/// Tells systemd how the service is doing: `READY=1`, `RELOADING=1`, `STOPPING=1`.
pub fn notify(state: &str) {
    send(state, &[]);
}

/// True when the unit keeps descriptors for keter.
fn store_allowed() -> bool {
    static ALLOWED: OnceLock<bool> = OnceLock::new();
    *ALLOWED.get_or_init(|| {
        std::env::var_os("NOTIFY_SOCKET").is_some()
            && ["FDSTORE", "KETER_FD_STORE"].iter().any(|v| {
                std::env::var(v)
                    .ok()
                    .and_then(|n| n.parse::<u32>().ok())
                    .is_some_and(|n| n > 0)
            })
    })
}

/// The store's name of the output pipe with inode `ino`.
fn pipe_name(ino: u64) -> String {
    format!("keter-output.{ino}")
}

/// Puts an app's output pipe (read end) into systemd's store, if it keeps one. Not polled by
/// systemd (`FDPOLL=0`): it must stay even when the app has closed its end.
pub fn keep_pipe(ino: u64, fd: BorrowedFd) {
    if store_allowed() {
        send(
            &format!("FDSTORE=1\nFDNAME={}\nFDPOLL=0", pipe_name(ino)),
            &[fd.as_raw_fd()],
        );
    }
}

/// Takes a pipe that has been read to its end out of the store.
pub fn forget_pipe(ino: u64) {
    if store_allowed() {
        send(&format!("FDSTOREREMOVE=1\nFDNAME={}", pipe_name(ino)), &[]);
    }
}

/// The output pipes systemd kept for this service and passed on at its start, by inode. Must
/// run before other threads start (it removes variables from the environment), and before
/// anything is started that could inherit them.
pub fn stored_pipes() -> HashMap<u64, File> {
    use std::os::unix::fs::MetadataExt;
    let mine = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        == Some(std::process::id());
    let count: RawFd = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
    // SAFETY: called at the start of `main`, before any other thread exists.
    unsafe {
        for v in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
            std::env::remove_var(v);
        }
    }
    let mut out = HashMap::new();
    if !mine {
        return out;
    }
    let names: Vec<&str> = names.split(':').collect();
    for i in 0..count.max(0) {
        let fd = LISTEN_FDS_START + i;
        // SAFETY: systemd passed descriptors 3..3+LISTEN_FDS to this process alone.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let _ = nix::fcntl::fcntl(
            &owned,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        );
        let named = names
            .get(i as usize)
            .and_then(|n| n.strip_prefix("keter-output."))
            .and_then(|ino| ino.parse::<u64>().ok());
        let file = File::from(owned);
        match named {
            Some(ino) if file.metadata().is_ok_and(|m| m.ino() == ino) => {
                out.insert(ino, file);
            }
            // Not one of keter's pipes, or not the pipe its name says: closed.
            _ => {}
        }
    }
    out
}
