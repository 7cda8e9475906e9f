//! Facts about processes and sockets read from `/proc`: the live members of a process group,
//! the TCP connections to a local port (to know when an old version has drained), who holds a
//! listening socket, how long a process has run, the output pipe of a process that an earlier
//! keter started, and which processes hold a socket (to name who holds a listener that keter
//! refuses to talk to).

use std::fs;

use crate::sockdiag;

/// Pids of the processes in group `pgid` that have not exited (zombies excluded).
pub fn group_members(pgid: i32) -> Vec<i32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if let Some((state, pgrp)) = stat_state_pgrp(pid)
            && pgrp == pgid
            && state != 'Z'
            && state != 'X'
        {
            out.push(pid);
        }
    }
    out
}

/// Field `n` (numbered from 1, as in proc(5)) of `/proc/PID/stat`, for `n` of 3 or more.
fn stat_field(pid: i32, n: usize) -> Option<String> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain spaces: fields from 3 on
    // start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(n.checked_sub(3)?).map(str::to_string)
}

/// State letter and process group of a pid, from `/proc/PID/stat`.
fn stat_state_pgrp(pid: i32) -> Option<(char, i32)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // One read for both fields: the process may exit between two.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split(' ');
    let state = fields.next()?.chars().next()?;
    let _ppid = fields.next()?;
    let pgrp = fields.next()?.parse().ok()?;
    Some((state, pgrp))
}

/// True when process `pid` is exiting (the kernel's `PF_EXITING`, set before it closes the
/// process's descriptors), a zombie, or gone.
pub fn exiting(pid: i32) -> bool {
    const PF_EXITING: u64 = 0x4;
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return true;
    };
    let Some(rest) = stat.rfind(')').and_then(|at| stat.get(at + 2..)) else {
        return true;
    };
    // state ppid pgrp session tty_nr tpgid flags
    let fields: Vec<&str> = rest.split(' ').take(7).collect();
    let state = fields.first().and_then(|s| s.chars().next());
    let flags = fields.get(6).and_then(|f| f.parse::<u64>().ok());
    matches!(state, None | Some('Z' | 'X')) || flags.is_none_or(|f| f & PF_EXITING != 0)
}

/// Number of established TCP connections whose local port is `port` (the app's side of the
/// connections to it), IPv4 and IPv6.
pub fn connections_to_port(port: u16) -> usize {
    match sockdiag::tcp_sockets(&[sockdiag::ESTABLISHED]) {
        Ok(sockets) => sockets.iter().filter(|s| s.local_port == port).count(),
        Err(_) => ["/proc/net/tcp", "/proc/net/tcp6"]
            .iter()
            .filter_map(|p| fs::read_to_string(p).ok())
            .map(|text| count_established(&text, port))
            .sum(),
    }
}

fn count_established(table: &str, port: u16) -> usize {
    const ESTABLISHED: &str = "01";
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() < 4 || cols[3] != ESTABLISHED {
                return false;
            }
            let port_of = |addr: &str| {
                addr.rsplit_once(':')
                    .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
            };
            // The app's side of the connection has the app's port as its local port.
            port_of(cols[1]) == Some(port)
        })
        .count()
}

/// The worker processes of Nginx master `master`: (pid, finishing its connections after a
/// reload). A worker that is "shutting down" no longer accepts connections but may still send
/// requests it accepted before the reload to an old app version.
pub fn nginx_workers(master: i32) -> Vec<(i32, bool)> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()))
        .filter(|pid| parent_of(*pid) == Some(master))
        .filter_map(|pid| {
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let title = String::from_utf8_lossy(&cmdline);
            title
                .contains("worker process")
                .then(|| (pid, title.contains("is shutting down")))
        })
        .collect()
}

/// Number of workers of `master` finishing their connections after a reload.
pub fn nginx_workers_shutting_down(master: i32) -> usize {
    nginx_workers(master).iter().filter(|(_, s)| *s).count()
}

/// The parent pid of a process.
pub fn parent_of(pid: i32) -> Option<i32> {
    stat_field(pid, 4)?.parse().ok()
}

/// True when a socket listening on TCP `port` belongs to a live process of group `pgid`.
pub fn port_listener_in_group(port: u16, pgid: i32) -> bool {
    let inodes: Vec<u64> = match sockdiag::tcp_sockets(&[sockdiag::LISTEN]) {
        Ok(sockets) => sockets
            .iter()
            .filter(|s| s.local_port == port)
            .map(|s| u64::from(s.inode))
            .collect(),
        Err(_) => return true, // cannot tell: the readiness answer itself has to do
    };
    !inodes.is_empty() && group_holds_socket(pgid, &inodes)
}

/// True when a live process of group `pgid` holds one of the sockets with these inodes. The
/// leader is looked at first: it is the one that normally listens, and finding it there spares
/// reading every process of the machine to list the group.
pub fn group_holds_socket(pgid: i32, inodes: &[u64]) -> bool {
    if inodes.is_empty() {
        return false;
    }
    let leader = stat_state_pgrp(pgid)
        .is_some_and(|(state, pgrp)| pgrp == pgid && state != 'Z' && state != 'X');
    if leader && holds_socket(pgid, inodes) {
        return true;
    }
    group_members(pgid)
        .into_iter()
        .filter(|pid| *pid != pgid)
        .any(|pid| holds_socket(pid, inodes))
}

/// The inode of the socket that the descriptor link `target` (`socket:[N]`) names.
fn socket_inode(target: &std::path::Path) -> Option<u64> {
    target
        .to_str()?
        .strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// True when process `pid` has a descriptor of one of the sockets with these inodes.
fn holds_socket(pid: i32, inodes: &[u64]) -> bool {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|fds| {
            fds.flatten().any(|fd| {
                fs::read_link(fd.path())
                    .ok()
                    .and_then(|t| socket_inode(&t))
                    .is_some_and(|i| inodes.contains(&i))
            })
        })
        .unwrap_or(false)
}

/// The live processes holding the socket with sockfs inode `inode` (as `sock_diag` and
/// `/proc/net/unix` number sockets), found through their descriptors in `/proc/PID/fd`; only
/// processes keter may look into (all of them, as root) are seen.
pub fn socket_holders(inode: u64) -> Vec<i32> {
    let wanted = format!("socket:[{inode}]");
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out: Vec<i32> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()))
        .filter(|pid| {
            fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
                fds.flatten().any(|fd| {
                    fs::read_link(fd.path()).is_ok_and(|t| t.as_os_str() == wanted.as_str())
                })
            })
        })
        .collect();
    out.sort_unstable();
    out
}

/// A process's command line with its arguments joined by spaces (its name in brackets when it
/// has none, as `ps` shows kernel threads), cut to `max` characters. What a process says here
/// is its own choice: print it escaped.
pub fn command_of(pid: i32, max: usize) -> Option<String> {
    let raw = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let line: Vec<String> = raw
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let text = if line.is_empty() {
        let comm = fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        format!("[{}]", comm.trim_end())
    } else {
        line.join(" ")
    };
    Some(text.chars().take(max).collect())
}

/// The sockfs inodes of the unix sockets listening at `path` (from `/proc/net/unix`, which
/// names each bound socket's path). Paths with a newline cannot be read back from that table
/// and are never found.
pub fn unix_listeners_at(path: &std::path::Path) -> Vec<u64> {
    // __SO_ACCEPTCON in the Flags column: the socket listens.
    const LISTENING: u32 = 1 << 16;
    let Ok(table) = fs::read_to_string("/proc/net/unix") else {
        return Vec::new();
    };
    table
        .lines()
        .skip(1)
        .filter_map(unix_row)
        .filter(|(flags, _, listed)| flags & LISTENING != 0 && std::path::Path::new(listed) == path)
        .map(|(_, inode, _)| inode)
        .collect()
}

/// Flags, inode and path of one row of `/proc/net/unix` (`Num RefCount Protocol Flags Type St
/// Inode Path`: columns padded with spaces, the path, which may contain spaces, after one
/// space); `None` for a socket without a path.
fn unix_row(line: &str) -> Option<(u32, u64, &str)> {
    let mut rest = line;
    let mut cols = [""; 7];
    for col in cols.iter_mut() {
        rest = rest.trim_start_matches(' ');
        let end = rest.find(' ').unwrap_or(rest.len());
        *col = &rest[..end];
        rest = &rest[end..];
    }
    let path = rest.strip_prefix(' ').filter(|p| !p.is_empty())?;
    let flags = u32::from_str_radix(cols[3], 16).ok()?;
    let inode = cols[6].parse().ok()?;
    Some((flags, inode, path))
}

/// True while a process exists and has not exited (zombies count as exited).
pub fn is_alive(pid: i32) -> bool {
    stat_state_pgrp(pid).is_some_and(|(state, _)| state != 'Z' && state != 'X')
}

/// When a process started, in clock ticks since boot (`/proc/PID/stat` field 22).
pub fn start_ticks(pid: i32) -> Option<u64> {
    stat_field(pid, 22)?.parse().ok()
}

/// How long process `pid` has been running, from its start time and the system's uptime.
pub fn age(pid: i32) -> Option<std::time::Duration> {
    let ticks = start_ticks(pid)?;
    let uptime: f64 = fs::read_to_string("/proc/uptime")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|hz| *hz > 0)
        .unwrap_or(100);
    let started = ticks as f64 / hz as f64;
    Some(std::time::Duration::from_secs_f64(
        (uptime - started).max(0.0),
    ))
}

/// Opens, for reading, the pipe with inode `ino` that a live member of process group `pgid`
/// holds (through `/proc/PID/fd`, which opens the pipe itself, as a FIFO is opened), without
/// blocking and closed at exec. That is how a keter started again reads the output of an app
/// an earlier keter started: the app holds its pipe open for reading too (`process::spawn`),
/// so the pipe outlives the keter that made it.
pub fn open_pipe_of_group(pgid: i32, ino: u64) -> Option<fs::File> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let wanted = format!("pipe:[{ino}]");
    let mut members = group_members(pgid);
    // The leader first: it is the one that normally holds the pipe.
    members.sort_by_key(|p| *p != pgid);
    for pid in members {
        let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if fs::read_link(fd.path()).is_ok_and(|t| t.as_os_str() == wanted.as_str())
                && let Ok(file) = fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
                    .open(fd.path())
                && file.metadata().is_ok_and(|m| m.ino() == ino)
            {
                return Some(file);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_established_connections_on_local_port() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:0FA0 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1\n   1: 0100007F:0FA0 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 2\n   2: 0100007F:D431 0100007F:0FA0 01 00000000:00000000 00:00000000 00000000     0        0 3\n   3: 0100007F:0FA0 0100007F:D432 06 00000000:00000000 00:00000000 00000000     0        0 4\n";
        assert_eq!(count_established(table, 4000), 1);
        assert_eq!(count_established(table, 4001), 0);
    }

    #[test]
    fn a_running_process_is_not_exiting_and_a_zombie_or_a_gone_one_is() {
        assert!(!exiting(std::process::id() as i32));
        let mut child = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        assert!(!exiting(pid));
        child.kill().unwrap();
        // Not reaped yet: a zombie once its exit is done.
        let started = std::time::Instant::now();
        while !exiting(pid) {
            assert!(started.elapsed() < std::time::Duration::from_secs(10));
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        child.wait().unwrap();
        assert!(exiting(pid), "a process gone");
    }

    #[test]
    fn finds_own_group_and_own_listener() {
        let pgid = nix::unistd::getpgrp().as_raw();
        assert!(!group_members(pgid).is_empty());
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert!(port_listener_in_group(port, pgid));
        assert!(!port_listener_in_group(port, 1));
        assert_eq!(connections_to_port(port), 0);
        let _c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (_s, _) = listener.accept().unwrap();
        assert_eq!(connections_to_port(port), 1);
    }

    #[test]
    fn reads_unix_rows_with_padded_columns_and_spaces_in_paths() {
        let listening =
            "00000000d19e4cea: 00000002 00000000 00010000 0001 01 17348 /run/pg dir/.s.PGSQL.5432";
        assert_eq!(
            unix_row(listening),
            Some((0x10000, 17348, "/run/pg dir/.s.PGSQL.5432"))
        );
        let padded = "0000000056306523: 00000003 00000000 00000000 0001 03  1099 /x";
        assert_eq!(unix_row(padded), Some((0, 1099, "/x")));
        let unnamed = "000000002a00ad13: 00000003 00000000 00000000 0001 03 21681";
        assert_eq!(unix_row(unnamed), None);
    }

    #[test]
    fn names_the_holder_of_a_tcp_and_a_unix_listener() {
        use std::os::unix::fs::MetadataExt;
        let me = std::process::id() as i32;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let inode = sockdiag::tcp_sockets(&[sockdiag::LISTEN])
            .unwrap()
            .into_iter()
            .find(|s| s.local_port == port)
            .unwrap()
            .inode;
        assert_eq!(socket_holders(u64::from(inode)), [me]);
        let command = command_of(me, 4096).unwrap();
        let exe = std::env::current_exe().unwrap();
        assert!(command.starts_with(exe.to_str().unwrap()), "{command}");
        assert_eq!(command_of(me, 3).unwrap().chars().count(), 3);

        let dir = std::env::temp_dir().join(format!("keter-unit-unix-{me}"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a socket");
        let unix = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let found = unix_listeners_at(&path);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(socket_holders(found[0]), [me]);
        assert!(unix_listeners_at(&dir.join("other")).is_empty());
        // The file's own inode is not the socket's.
        assert_ne!(fs::metadata(&path).unwrap().ino(), found[0]);
        drop(unix);
        fs::remove_dir_all(&dir).unwrap();
    }
}
