//! The port pool: the one owner of which local ports apps get; and who else holds a port.
//!
//! A port is handed out only if keter does not hold it already and nothing else is listening
//! on it (Piku #125 picked ports by bind-then-close and raced other processes; Keter #324 never
//! returned ports). Every exit path of an app returns its port with [`PortPool::release`].
//!
//! Ports are no secret (`/proc/net/tcp` lists them to everyone), so a port that keter gave a
//! webapp may be bound by another program while that webapp is down between a crash and its
//! restart. [`port_use`] tells the app's worker who holds it, so that the webapp is started
//! again elsewhere instead of Nginx sending its users to that program (README "Supervision").

use std::collections::BTreeSet;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::ops::RangeInclusive;
use std::sync::Mutex;
use std::time::Duration;

use crate::{procfs, sockdiag};

/// Hands out ports from a range, round robin, so a just-freed port is not reused at once.
#[derive(Debug)]
pub struct PortPool {
    range: RangeInclusive<u16>,
    state: Mutex<PoolState>,
}

#[derive(Debug)]
struct PoolState {
    /// Ports handed out and not yet released.
    taken: BTreeSet<u16>,
    /// Where the next search starts.
    next: u16,
}

impl PortPool {
    pub fn new(range: RangeInclusive<u16>) -> PortPool {
        let next = *range.start();
        PortPool {
            range,
            state: Mutex::new(PoolState {
                taken: BTreeSet::new(),
                next,
            }),
        }
    }

    /// A free port, or `None` when every port of the range is taken or in use by others.
    pub fn acquire(&self) -> Option<u16> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (first, last) = (*self.range.start(), *self.range.end());
        let count = u32::from(last - first) + 1;
        for i in 0..count {
            let port = (u32::from(st.next - first) + i) % count + u32::from(first);
            let port = port as u16;
            if st.taken.contains(&port) || !nobody_listens(port) {
                continue;
            }
            st.taken.insert(port);
            st.next = if port == last { first } else { port + 1 };
            return Some(port);
        }
        None
    }

    /// Marks a port as handed out: one that a process taken over from an earlier keter holds.
    pub fn claim(&self, port: u16) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.taken.insert(port);
    }

    /// Returns a port to the pool. Releasing a port that is not taken is a no-op.
    pub fn release(&self, port: u16) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.taken.remove(&port);
    }

    /// How many ports are currently handed out.
    pub fn taken(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .taken
            .len()
    }
}

/// True when no socket listens on the port on loopback or on every address.
fn nobody_listens(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    // Binding fails if anyone listens on 127.0.0.1, 0.0.0.0 or a dual-stack [::].
    if TcpListener::bind(addr).is_err() {
        return false;
    }
    // A listener bound with SO_REUSEPORT would not stop the bind above; a connect would reach it.
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err()
}

/// Who uses a webapp's port, as its worker asks before starting the webapp on it again and
/// while the webapp has no listener of its own there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortUse {
    /// Nobody listens on it, and it can be bound.
    Free,
    /// A process of the webapp's own process group listens on it.
    Own,
    /// Someone else holds it: a listener outside the webapp's group, or a socket bound to it
    /// that keeps the webapp from binding it.
    Other(Holder),
    /// The webapp's own process is exiting: the listener on the port may be its own, being
    /// closed, which no process holds any more. Looked at again; the look before the
    /// webapp's restart, once its exit is known, tells.
    Unsure,
}

/// Whoever holds a port that is not theirs to hold, as far as the kernel says.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Holder {
    /// The uid that made the socket; `None` for a socket bound without listening, which the
    /// kernel's listing of listeners does not show.
    pub uid: Option<u32>,
    /// The user of that uid, when it has one.
    pub user: Option<String>,
    /// A process holding the socket, when one is found.
    pub pid: Option<i32>,
    /// Its command line, cut to [`COMMAND_SHOWN`] characters.
    pub command: Option<String>,
}

/// How much of a holder's command line the log shows.
const COMMAND_SHOWN: usize = 200;

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.uid {
            Some(uid) => {
                write!(f, "uid {uid}")?;
                if let Some(user) = &self.user {
                    write!(f, " ({user})")?;
                }
            }
            None => f.write_str("a socket bound to it without listening, of an unknown owner")?,
        }
        if let Some(pid) = self.pid {
            write!(f, ", pid {pid}")?;
        }
        if let Some(command) = &self.command {
            // The command line is the holder's to choose: escaped, so that it cannot forge
            // lines of keter's log.
            write!(f, " ({})", command.escape_debug())?;
        }
        Ok(())
    }
}

/// How closely [`port_use`] looks at a port nobody's process of the webapp runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Look {
    /// Every listener of the machine on that port, on any address (a listener on
    /// `127.0.0.2` gets no request of Nginx's, but keeps a webapp that binds every address
    /// from starting), then a test bind: before a webapp starts there.
    Full,
    /// A test bind alone, as the webapp binds (any listener on `127.0.0.1`, `0.0.0.0` or a
    /// dual-stack `[::]`, where Nginx's requests would reach it, makes it fail): the watch
    /// while the webapp waits for its restart, which costs a few microseconds where listing
    /// every listener costs tens.
    Quick,
}

/// Who uses TCP `port`, for a webapp whose process group is led by `own` (`None` while the
/// webapp does not run). Any listener on the port, on any address, that is not the group's is
/// someone else's; with no process running, a port that cannot be bound (as the webapp binds
/// it, with `SO_REUSEADDR`, on `127.0.0.1` where Nginx connects) is held too. A webapp that
/// runs is never raced by a test bind: it may be binding the port at that moment.
pub fn port_use(port: u16, own: Option<i32>, look: Look) -> PortUse {
    let bound = || own.is_none() && !bindable(port);
    if own.is_none() && look == Look::Quick && !bound() {
        return PortUse::Free;
    }
    let listeners = listeners_on(port);
    if !listeners.is_empty() {
        let inodes: Vec<u64> = listeners.iter().map(|(_, inode)| *inode).collect();
        if let Some(group) = own {
            if procfs::group_holds_socket(group, &inodes) {
                return PortUse::Own;
            }
            // Its leader exiting, the kernel has taken its descriptors away and may not have
            // closed the listener yet.
            if procfs::exiting(group) {
                return PortUse::Unsure;
            }
        }
        let (uid, inode) = listeners[0];
        return PortUse::Other(Holder::of(uid, inode));
    }
    if bound() {
        return PortUse::Other(Holder::default());
    }
    PortUse::Free
}

impl Holder {
    /// The holder of the socket with this inode, made by `uid`.
    fn of(uid: u32, inode: u64) -> Holder {
        let pid = procfs::socket_holders(inode).first().copied();
        Holder {
            uid: Some(uid),
            user: nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
                .ok()
                .flatten()
                .map(|u| u.name),
            pid,
            command: pid.and_then(|p| procfs::command_of(p, COMMAND_SHOWN)),
        }
    }
}

/// (uid, inode) of every TCP socket listening on `port`, IPv4 and IPv6: from the kernel's
/// sock_diag interface, or from `/proc/net/tcp*` where that is not available.
fn listeners_on(port: u16) -> Vec<(u32, u64)> {
    match sockdiag::tcp_sockets(&[sockdiag::LISTEN]) {
        Ok(sockets) => sockets
            .iter()
            .filter(|s| s.local_port == port)
            .map(|s| (s.uid, u64::from(s.inode)))
            .collect(),
        Err(_) => ["/proc/net/tcp", "/proc/net/tcp6"]
            .iter()
            .filter_map(|p| std::fs::read_to_string(p).ok())
            .flat_map(|table| listeners_in_table(&table, port))
            .collect(),
    }
}

/// The listeners on `port` in a `/proc/net/tcp` table: (uid, inode).
fn listeners_in_table(table: &str, port: u16) -> Vec<(u32, u64)> {
    const LISTEN: &str = "0A";
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() < 10 || cols[3] != LISTEN {
                return None;
            }
            let local = cols[1].rsplit_once(':')?.1;
            (u16::from_str_radix(local, 16).ok()? == port)
                .then(|| Some((cols[7].parse().ok()?, cols[9].parse().ok()?)))?
        })
        .collect()
}

/// True when `127.0.0.1:port` can be bound as a webapp binds it (`SO_REUSEADDR`, so that the
/// TIME_WAIT connections its last process left do not count). The socket never listens, so no
/// connection of Nginx's can land on it meanwhile.
fn bindable(port: u16) -> bool {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrIn, bind, setsockopt, socket, sockopt,
    };
    let Ok(fd) = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    ) else {
        // Cannot tell: the check after the start (the webapp's own listener) has to do.
        return true;
    };
    let _ = setsockopt(&fd, sockopt::ReuseAddr, &true);
    let addr = SockaddrIn::new(127, 0, 0, 1, port);
    bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skips_a_port_in_use_and_hands_each_port_out_once() {
        // A range of one port, so that other programs on the machine cannot interfere.
        let busy = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = busy.local_addr().unwrap().port();
        let pool = PortPool::new(port..=port);
        assert_eq!(
            pool.acquire(),
            None,
            "a port something listens on was handed out"
        );
        drop(busy);
        assert_eq!(pool.acquire(), Some(port));
        assert_eq!(pool.acquire(), None, "a port was handed out twice");
        assert_eq!(pool.taken(), 1);
        pool.release(port);
        assert_eq!(pool.taken(), 0);
        assert_eq!(pool.acquire(), Some(port));
    }

    /// A webapp killed while its worker looks at its port (the look while it has not been seen
    /// listening yet): the kernel takes the process's descriptors away before it closes them,
    /// so for a moment its listener is there and no process holds it. That is the webapp's
    /// own listener closing, never someone else's: the webapp was moved to another port for
    /// it, and the log blamed another program with the webapp's own uid. Looped until the
    /// look falls into that moment; with many descriptors to close, it does within a few
    /// rounds.
    #[test]
    fn the_listener_of_an_own_webapp_that_is_exiting_is_not_someone_elses() {
        use nix::sys::signal::{Signal, kill};
        use nix::unistd::{ForkResult, Pid, fork};
        let mut looks = 0;
        for round in 0..40 {
            let port = TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            // SAFETY: the child makes system calls only (no allocation, no lock) and never
            // returns.
            let child = match unsafe { fork() }.unwrap() {
                ForkResult::Child => unsafe {
                    // Not the other tests' sockets, which this process would hold open.
                    libc::syscall(libc::SYS_close_range, 3, u32::MAX, 0);
                    libc::setpgid(0, 0);
                    let limit = libc::rlimit {
                        rlim_cur: 20_000,
                        rlim_max: 20_000,
                    };
                    libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
                    let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY);
                    for _ in 0..15_000 {
                        if libc::dup(null) < 0 {
                            break;
                        }
                    }
                    // The listener last: the kernel closes it after all the others.
                    let s = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
                    let one: libc::c_int = 1;
                    libc::setsockopt(
                        s,
                        libc::SOL_SOCKET,
                        libc::SO_REUSEADDR,
                        (&one as *const libc::c_int).cast(),
                        std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                    );
                    let addr = libc::sockaddr_in {
                        sin_family: libc::AF_INET as libc::sa_family_t,
                        sin_port: port.to_be(),
                        sin_addr: libc::in_addr {
                            s_addr: u32::from(Ipv4Addr::LOCALHOST).to_be(),
                        },
                        sin_zero: [0; 8],
                    };
                    libc::bind(
                        s,
                        (&addr as *const libc::sockaddr_in).cast(),
                        std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                    );
                    libc::listen(s, 16);
                    loop {
                        libc::pause();
                    }
                },
                ForkResult::Parent { child } => child,
            };
            let pgid = child.as_raw();
            let started = std::time::Instant::now();
            while port_use(port, Some(pgid), Look::Quick) != PortUse::Own {
                assert!(
                    started.elapsed() < Duration::from_secs(10),
                    "round {round}: the child never listened on {port}"
                );
                std::thread::sleep(Duration::from_millis(2));
            }
            kill(Pid::from_raw(pgid), Signal::SIGKILL).unwrap();
            loop {
                looks += 1;
                match port_use(port, Some(pgid), Look::Quick) {
                    PortUse::Other(holder) => {
                        let _ = nix::sys::wait::waitpid(child, None);
                        panic!(
                            "round {round}: the own webapp's listener, closing, was taken for {holder}'s"
                        );
                    }
                    PortUse::Free => break,
                    PortUse::Own | PortUse::Unsure => {}
                }
            }
            nix::sys::wait::waitpid(child, None).unwrap();
        }
        assert!(
            looks > 40,
            "the looks never fell between the kill and the close"
        );
    }

    #[test]
    fn tells_the_own_listener_from_someone_elses_and_from_a_bound_socket() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let me = nix::unistd::getpgrp().as_raw();
        assert_eq!(port_use(port, Some(me), Look::Full), PortUse::Own);
        // For another group (pid 1's), this process's listener is someone else's, named.
        let PortUse::Other(holder) = port_use(port, Some(1), Look::Full) else {
            panic!("a listener of another group was not seen");
        };
        assert_eq!(holder.uid, Some(nix::unistd::geteuid().as_raw()));
        assert_eq!(holder.pid, Some(std::process::id() as i32));
        assert!(holder.command.is_some(), "{holder}");
        for look in [Look::Full, Look::Quick] {
            assert!(matches!(port_use(port, None, look), PortUse::Other(_)));
        }
        drop(listener);
        for look in [Look::Full, Look::Quick] {
            assert_eq!(port_use(port, None, look), PortUse::Free);
        }
        // A listener on another loopback address gets none of Nginx's requests, but keeps a
        // webapp that binds every address from starting: only the full look sees it.
        let aside = TcpListener::bind(("127.0.0.2", port)).unwrap();
        assert_eq!(port_use(port, None, Look::Quick), PortUse::Free);
        assert!(matches!(
            port_use(port, None, Look::Full),
            PortUse::Other(_)
        ));
        drop(aside);
        // Bound without listening and without SO_REUSEADDR: nobody else can bind it.
        use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrIn, bind, socket};
        let fd = socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        bind(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            &SockaddrIn::new(127, 0, 0, 1, port),
        )
        .unwrap();
        let PortUse::Other(holder) = port_use(port, None, Look::Quick) else {
            panic!("a bound socket was not seen");
        };
        assert_eq!(holder.uid, None);
        assert!(holder.to_string().contains("without listening"), "{holder}");
        // A webapp that runs is not raced by a test bind.
        assert_eq!(port_use(port, Some(me), Look::Full), PortUse::Free);
    }

    #[test]
    fn reads_listeners_from_proc_net_tcp_and_escapes_the_command() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:0FA0 00000000:0000 0A 00000000:00000000 00:00000000 00000000 65537        0 4242 1 0\n   1: 0100007F:0FA0 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 2\n";
        assert_eq!(listeners_in_table(table, 4000), [(65537, 4242)]);
        assert!(listeners_in_table(table, 4001).is_empty());
        let h = Holder {
            uid: Some(65537),
            user: Some("keter-b".into()),
            pid: Some(7),
            command: Some("evil\nketer: forged".into()),
        };
        assert_eq!(
            h.to_string(),
            "uid 65537 (keter-b), pid 7 (evil\\nketer: forged)"
        );
    }
}
