//! systemd's file descriptor store, with a stand-in for systemd: the test receives keter's
//! notifications (`NOTIFY_SOCKET`) with the pipes keter stores, and passes them back when it
//! starts keter again (`LISTEN_FDS`, `LISTEN_FDNAMES`, `LISTEN_PID`), as systemd does for a
//! unit with `FileDescriptorStoreMax=`. What an app printed before it ended, while no keter
//! ran, reaches its log. (The Debian package's test checks the same under a booted systemd.)

use std::collections::BTreeMap;
use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::sys::socket::{ControlMessageOwned, MsgFlags};

use crate::support::*;

const WAIT: Duration = Duration::from_secs(30);

/// What the stand-in systemd keeps: the store by name, and every state line received.
#[derive(Default)]
struct Systemd {
    store: BTreeMap<String, OwnedFd>,
    states: Vec<String>,
}

/// Receives notifications on `socket` for as long as the test runs.
fn serve(socket: UnixDatagram, systemd: Arc<Mutex<Systemd>>) {
    std::thread::spawn(move || {
        loop {
            let mut buf = [0u8; 4096];
            let mut iov = [IoSliceMut::new(&mut buf)];
            let mut space = nix::cmsg_space!([RawFd; 16]);
            let Ok(msg) = nix::sys::socket::recvmsg::<()>(
                socket.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::empty(),
            ) else {
                return;
            };
            let mut fds = Vec::new();
            for c in msg.cmsgs().unwrap() {
                if let ControlMessageOwned::ScmRights(r) = c {
                    // SAFETY: received with SCM_RIGHTS: new descriptors of this process.
                    fds.extend(r.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
                }
            }
            let n = msg.bytes;
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            let field = |k: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(&format!("{k}=")))
                    .map(str::to_string)
            };
            let mut s = systemd.lock().unwrap();
            if field("FDSTORE").as_deref() == Some("1") {
                assert_eq!(field("FDPOLL").as_deref(), Some("0"), "{text}");
                let name = field("FDNAME").unwrap();
                if let Some(fd) = fds.pop() {
                    s.store.insert(name, fd);
                }
            } else if field("FDSTOREREMOVE").as_deref() == Some("1") {
                s.store.remove(&field("FDNAME").unwrap());
            }
            s.states.push(text);
        }
    });
}

#[test]
fn the_last_words_of_an_app_that_ends_while_keter_is_down_reach_its_log() {
    let dir = TempDir::new("fd-store-notify");
    let socket_path = dir.0.join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    let systemd = Arc::new(Mutex::new(Systemd::default()));
    serve(socket, systemd.clone());
    let mut k = Keter::start_with(
        "fd-store",
        Opts {
            env: vec![
                ("NOTIFY_SOCKET".into(), socket_path.display().to_string()),
                ("KETER_FD_STORE".into(), "64".into()),
            ],
            ..Opts::default()
        },
    );
    k.deploy_hello("a", "a1", "a.example.com", &[]);
    k.wait_for("a.example.com", "a1", WAIT);
    let pid = k.pid_of("a.example.com");
    {
        let s = systemd.lock().unwrap();
        assert!(s.states.iter().any(|t| t == "READY=1"), "{:?}", s.states);
        assert_eq!(s.store.len(), 1, "one pipe stored: {:?}", s.store.keys());
    }
    let _ = k.signal_and_wait(Signal::SIGKILL);
    // The app says its last words and ends while no keter runs.
    let _ = k.get("a.example.com", "/exit");
    assert!(wait_gone(pid, WAIT));
    // Started again as systemd starts a unit with a store: the stored descriptors from 3 on,
    // named, for this process (the shell keeps its pid across the exec).
    let stored: Vec<(String, RawFd)> = {
        let s = systemd.lock().unwrap();
        s.store
            .iter()
            .map(|(n, fd)| (n.clone(), fd.as_raw_fd()))
            .collect()
    };
    let names: Vec<&str> = stored.iter().map(|(n, _)| n.as_str()).collect();
    let fds: Vec<RawFd> = stored.iter().map(|(_, fd)| *fd).collect();
    let (count, names) = (fds.len().to_string(), names.join(":"));
    let wrapper = dir.0.join("keter-as-a-unit");
    std::fs::write(
        &wrapper,
        format!("#!/bin/sh\nLISTEN_PID=$$ exec {} \"$@\"\n", k.bin.display()),
    )
    .unwrap();
    set_mode(&wrapper, 0o755);
    k.bin = wrapper;
    k.launch_with(move |cmd| {
        cmd.env("LISTEN_FDS", &count).env("LISTEN_FDNAMES", &names);
        // SAFETY: dup2 is async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                for (i, fd) in fds.iter().enumerate() {
                    if libc::dup2(*fd, 3 + i as i32) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
    });
    k.wait_log(&format!("pid {pid} (port"), WAIT);
    let log = std::fs::read_to_string(k.root.join("log/app-a.log")).unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    while !std::fs::read_to_string(k.root.join("log/app-a.log"))
        .unwrap()
        .contains("hello a1: exiting on request")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the last words are lost:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The ended app's pipe is out of the store once read; the restarted app's is in.
    k.wait_for("a.example.com", "a1", WAIT);
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let names: Vec<String> = systemd.lock().unwrap().store.keys().cloned().collect();
        if names.len() == 1 && !stored.iter().any(|(n, _)| names.contains(n)) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "store: {names:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
