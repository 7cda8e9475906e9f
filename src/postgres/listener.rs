//! Who answers at the PostgreSQL server's address: what keter checks before it sends a
//! credential there (README, "PostgreSQL plugin", "Who keter gives a password to").
//!
//! While the server does not listen (stopped, restarting, not started yet at boot), any local
//! process may take its TCP port, or plant a socket in a socket folder it can write, and ask
//! the next client for its password in clear text. So keter opens the connection itself, and
//! for a server on this machine checks, before a byte is sent:
//!
//! * TCP to one of this host's addresses (loopback, unspecified, or an address of one of its
//!   interfaces, however `host` spells it): every listening socket that could take the
//!   connection (from the kernel's sock_diag table) belongs to root or to the server's user;
//!   then, once connected, so does the server's end of this very connection, which closes the
//!   window between the check and the connect.
//! * A socket folder: every folder on the way to it, symlinks followed, belongs to root or the
//!   server's user and cannot be written by anyone else (a sticky folder may be, if what keter
//!   goes through in it is theirs); the socket file belongs to them; and so does the process
//!   at the other end of the connection (`SO_PEERCRED`).
//!
//! A server on another machine cannot be checked this way: keter connects to it as before.
//! Apps get the socket folder only if nobody but root and the server's user may write it at
//! all ([`FolderUse::Apps`]): their drivers check nothing, and a sticky folder lets anyone plant
//! a socket while the server is down.

use std::collections::HashSet;
use std::fmt;
use std::fs::{self, Metadata};
use std::io;
use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::UnixStream;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use crate::{procfs, sockdiag};

use super::Server;

/// The longest command line of a holder that keter logs.
const COMMAND_CHARS: usize = 160;
/// Symlinks followed on the way to a socket folder before keter gives up (Linux's own limit).
const MAX_SYMLINKS: usize = 40;

/// Who may hold the server's listeners: root, and the user the server runs as
/// (`postgres.server-user`, by default `postgres`, Debian's). Root is trusted because it can
/// do anything anyway, and because a root process legitimately holds a server's port in
/// front of a container (Docker's `docker-proxy`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trust {
    /// As configured: a user name or a uid.
    user: String,
    /// Its uid and primary group; `None` when no such user exists on this host.
    ids: Option<(u32, u32)>,
}

impl Trust {
    /// Looks `user` (a name or a uid) up in the user database now.
    pub fn resolve(user: &str) -> Trust {
        let found = match user.parse::<u32>() {
            Ok(uid) => nix::unistd::User::from_uid(uid.into()),
            Err(_) => nix::unistd::User::from_name(user),
        };
        let ids = match found {
            Ok(Some(u)) => Some((u.uid.as_raw(), u.gid.as_raw())),
            // A uid without a name is still that uid.
            _ => user.parse::<u32>().ok().map(|uid| (uid, u32::MAX)),
        };
        Trust {
            user: user.to_string(),
            ids,
        }
    }

    /// A trust with explicit ids, for tests.
    #[cfg(test)]
    pub fn with_ids(user: &str, uid: u32, gid: u32) -> Trust {
        Trust {
            user: user.to_string(),
            ids: Some((uid, gid)),
        }
    }

    fn uid_ok(&self, uid: u32) -> bool {
        uid == 0 || self.ids.is_some_and(|(u, _)| u == uid)
    }

    /// Groups whose members may write the server's folders: root's and the server user's
    /// primary group (Debian's `/run/postgresql` is `postgres:postgres`, mode 2775). No app
    /// is ever in them: each app's user has a group of its own and no other.
    fn gid_ok(&self, gid: u32) -> bool {
        gid == 0 || self.ids.is_some_and(|(_, g)| g == gid)
    }
}

impl fmt::Display for Trust {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ids {
            Some((uid, _)) => write!(
                f,
                "root and the server's user {} (uid {uid}; postgres.server-user)",
                self.user
            ),
            None => write!(
                f,
                "root (the server's user {} does not exist on this host; postgres.server-user)",
                self.user
            ),
        }
    }
}

/// Where a connection that keter opened goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// TCP to this host, checked: the server's address as the connection sees it.
    Local(SocketAddr),
    /// TCP to another machine: not checked.
    Remote(SocketAddr),
    /// A socket in this folder, checked.
    Socket(PathBuf),
}

/// A connection keter opened (and checked, unless it goes to another machine).
#[derive(Debug)]
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// Why no connection was handed out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenError {
    /// Nothing answers (or the name does not resolve): the server is down or elsewhere.
    Unreachable(String),
    /// Something answers that keter does not trust with a credential; nothing was sent.
    Untrusted(String),
}

/// Opens a connection to `server` that keter may send credentials over (module doc).
pub fn open(
    server: &Server,
    trust: &Trust,
    timeout: Duration,
) -> Result<(Stream, Route), OpenError> {
    if server.is_socket() {
        let folder = Path::new(server.host());
        open_unix(folder, server.port, trust)
            .map(|s| (Stream::Unix(s), Route::Socket(folder.to_path_buf())))
    } else {
        open_tcp(server.host(), server.port, trust, timeout)
    }
}

fn open_tcp(
    host: &str,
    port: u16,
    trust: &Trust,
    timeout: Duration,
) -> Result<(Stream, Route), OpenError> {
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| OpenError::Unreachable(format!("cannot resolve {host}: {e}")))?
        .collect();
    let own = own_addresses();
    let mut failures = Vec::new();
    // In the resolver's order, as libpq tries them; a listener keter does not trust at any of
    // them stops everything: the apps' drivers would try that address too.
    for addr in addrs {
        let local = is_local(addr.ip(), &own);
        if local {
            let listeners = listeners_for(addr).map_err(|e| {
                OpenError::Untrusted(format!(
                    "cannot ask the kernel who listens on {addr} (sock_diag): {e}"
                ))
            })?;
            if let Some(bad) = listeners.iter().find(|l| !trust.uid_ok(l.uid)) {
                return Err(OpenError::Untrusted(format!(
                    "the socket listening on {} belongs to {}, {}; only {trust} may hold the server's port",
                    SocketAddr::new(bad.local_addr, bad.local_port),
                    user_of(bad.uid),
                    holders(u64::from(bad.inode)),
                )));
            }
            if listeners.is_empty() {
                failures.push(format!("nothing listens on {addr}"));
                continue;
            }
        }
        let stream = match TcpStream::connect_timeout(&addr, timeout) {
            Ok(s) => s,
            Err(e) => {
                failures.push(format!("{addr}: {e}"));
                continue;
            }
        };
        if !local {
            return Ok((Stream::Tcp(stream), Route::Remote(addr)));
        }
        let (server_end, client_end) = match (stream.peer_addr(), stream.local_addr()) {
            (Ok(p), Ok(l)) => (p, l),
            (Err(e), _) | (_, Err(e)) => {
                failures.push(format!("{addr}: {e}"));
                continue;
            }
        };
        // The socket the kernel made for this connection on the server's side belongs to the
        // owner of the listener that took it: a listener taken over since the check above
        // shows here.
        return match sockdiag::tcp_socket_uid(server_end, client_end) {
            Ok(Some(uid)) if trust.uid_ok(uid) => {
                Ok((Stream::Tcp(stream), Route::Local(server_end)))
            }
            Ok(Some(uid)) => Err(OpenError::Untrusted(format!(
                "the connection to {server_end} was taken by a socket of {}{}; only {trust} may hold the server's port",
                user_of(uid),
                listeners_for(server_end)
                    .ok()
                    .and_then(|ls| ls.into_iter().find(|l| l.uid == uid))
                    .map(|l| format!(", {}", holders(u64::from(l.inode))))
                    .unwrap_or_default()
            ))),
            Ok(None) => Err(OpenError::Untrusted(format!(
                "the server's end of the connection to {server_end} is not among this host's sockets (a server reached through NAT into a container, say), so keter cannot tell who holds it"
            ))),
            Err(e) => Err(OpenError::Untrusted(format!(
                "cannot ask the kernel who holds the server's end of the connection to {server_end} (sock_diag): {e}"
            ))),
        };
    }
    Err(OpenError::Unreachable(if failures.is_empty() {
        format!("{host} resolves to no address")
    } else {
        failures.join("; ")
    }))
}

/// The addresses of this host's interfaces. If they cannot be read, only loopback and
/// unspecified addresses count as local.
fn own_addresses() -> HashSet<IpAddr> {
    let Ok(interfaces) = nix::ifaddrs::getifaddrs() else {
        return HashSet::new();
    };
    interfaces
        .filter_map(|i| {
            let a = i.address?;
            if let Some(v4) = a.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .collect()
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is.
fn plain(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// True for an address whose listeners are sockets of this host: loopback, unspecified
/// (a connection to it goes to loopback), or one of `own`.
fn is_local(ip: IpAddr, own: &HashSet<IpAddr>) -> bool {
    let ip = plain(ip);
    ip.is_loopback() || ip.is_unspecified() || own.contains(&ip)
}

/// The listening sockets that a connection to `target` could reach: bound to its address
/// (an unspecified target is loopback), or to every address of its family, or to `::`,
/// which also takes IPv4 connections unless it is IPv6-only (which sock_diag does not say).
fn listeners_for(target: SocketAddr) -> io::Result<Vec<sockdiag::Socket>> {
    let ip = match plain(target.ip()) {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::from([127, 0, 0, 1]),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::from([0, 0, 0, 0, 0, 0, 0, 1u16]),
        ip => ip,
    };
    Ok(sockdiag::tcp_sockets(&[sockdiag::LISTEN])?
        .into_iter()
        .filter(|s| s.local_port == target.port() && reaches(s.local_addr, ip))
        .collect())
}

/// Whether a listener bound to `bound` may take a connection to `target`.
fn reaches(bound: IpAddr, target: IpAddr) -> bool {
    let bound = plain(bound);
    bound == target
        || match bound {
            IpAddr::V4(b) => b.is_unspecified() && target.is_ipv4(),
            IpAddr::V6(b) => b.is_unspecified(),
        }
}

/// "uid 65537 (keter-blog)", or "uid 65537" for a uid without a name.
fn user_of(uid: u32) -> String {
    match nix::unistd::User::from_uid(uid.into()) {
        Ok(Some(u)) => format!("uid {uid} ({})", u.name),
        _ => format!("uid {uid}"),
    }
}

/// Which processes hold the socket `inode`: "held by pid 42 (\"cmd args\")", escaped, since a
/// process chooses its own command line.
fn holders(inode: u64) -> String {
    let pids = procfs::socket_holders(inode);
    if pids.is_empty() {
        return "held by no process keter can see".into();
    }
    let named: Vec<String> = pids
        .iter()
        .take(3)
        .map(|pid| match procfs::command_of(*pid, COMMAND_CHARS) {
            Some(cmd) => format!("pid {pid} ({cmd:?})"),
            None => format!("pid {pid}"),
        })
        .collect();
    let more = pids.len().saturating_sub(named.len());
    format!(
        "held by {}{}",
        named.join(", "),
        if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        }
    )
}

fn open_unix(folder: &Path, port: u16, trust: &Trust) -> Result<UnixStream, OpenError> {
    let name = format!(".s.PGSQL.{port}");
    let resolved = check_folder(folder, trust, FolderUse::Keter).map_err(|why| {
        // Say who holds a socket there, if anyone does and it is not the server.
        let socket = folder.join(&name);
        let holder = fs::symlink_metadata(&socket)
            .ok()
            .and_then(|m| socket_file_ok(&socket, &m, trust).err());
        OpenError::Untrusted(match holder {
            Some(h) => format!("{why}; {h}"),
            None => why.to_string(),
        })
    })?;
    let socket = resolved.join(&name);
    let meta = match fs::symlink_metadata(&socket) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(OpenError::Unreachable(format!(
                "there is no socket {} (is the server running?)",
                socket.display()
            )));
        }
        Err(e) => {
            return Err(OpenError::Unreachable(format!(
                "cannot look at {}: {e}",
                socket.display()
            )));
        }
    };
    socket_file_ok(&socket, &meta, trust).map_err(|e| OpenError::Untrusted(e.to_string()))?;
    let stream = UnixStream::connect(&socket)
        .map_err(|e| OpenError::Unreachable(format!("{}: {e}", socket.display())))?;
    let peer = nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials)
        .map_err(|e| {
            OpenError::Untrusted(format!(
                "cannot ask who is at the other end of {} (SO_PEERCRED): {e}",
                socket.display()
            ))
        })?;
    if !trust.uid_ok(peer.uid()) {
        let command = procfs::command_of(peer.pid(), COMMAND_CHARS)
            .map(|c| format!(" ({c:?})"))
            .unwrap_or_default();
        return Err(OpenError::Untrusted(format!(
            "the process listening on {}, pid {}{command}, runs as {}; only {trust} may be the server",
            socket.display(),
            peer.pid(),
            user_of(peer.uid())
        )));
    }
    Ok(stream)
}

/// The socket file must be a socket of root or the server's user.
fn socket_file_ok(socket: &Path, meta: &Metadata, trust: &Trust) -> Result<(), SocketError> {
    if !meta.file_type().is_socket() {
        return Err(SocketError::NotASocket {
            path: socket.to_path_buf(),
            owner: user_of(meta.uid()),
        });
    }
    if !trust.uid_ok(meta.uid()) {
        let held: Vec<String> = procfs::unix_listeners_at(socket)
            .into_iter()
            .map(holders)
            .collect();
        return Err(SocketError::SocketOwner {
            path: socket.to_path_buf(),
            owner: user_of(meta.uid()),
            held,
            trust: trust.to_string(),
        });
    }
    Ok(())
}

/// Why a socket folder or a socket is not trusted, or cannot be looked at. Folders are shown
/// with their mode and owners ("/run/postgresql (mode 2775, owner ..., group 104)").
#[derive(Debug)]
pub enum SocketError {
    NotAbsolute(PathBuf),
    Look {
        path: PathBuf,
        source: io::Error,
    },
    ReadLink {
        path: PathBuf,
        source: io::Error,
    },
    TooManySymlinks(PathBuf),
    NotAFolder(PathBuf),
    /// A folder on the way may be written by others, who could replace `name` in it.
    OpenOnTheWay {
        folder: String,
        trust: String,
        name: PathBuf,
    },
    /// The socket folder itself may be written by others.
    OpenFolder {
        folder: String,
        trust: String,
        usage: FolderUse,
    },
    /// A folder on the way belongs to `owner`.
    FolderOwner {
        folder: String,
        owner: String,
        trust: String,
    },
    /// A folder on the way does not let apps search it.
    NotSearchable(String),
    NotASocket {
        path: PathBuf,
        owner: String,
    },
    /// The socket belongs to `owner`; `held` says which processes hold it.
    SocketOwner {
        path: PathBuf,
        owner: String,
        held: Vec<String>,
        trust: String,
    },
    /// The socket does not let apps connect (its mode).
    Closed {
        path: PathBuf,
        mode: u32,
    },
}

impl fmt::Display for SocketError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SocketError::NotAbsolute(p) => write!(f, "{} is not an absolute path", p.display()),
            SocketError::Look { path, source } => {
                write!(f, "cannot look at {}: {source}", path.display())
            }
            SocketError::ReadLink { path, source } => {
                write!(f, "cannot read the symlink {}: {source}", path.display())
            }
            SocketError::TooManySymlinks(p) => write!(
                f,
                "more than {MAX_SYMLINKS} symlinks on the way to {}",
                p.display()
            ),
            SocketError::NotAFolder(p) => write!(f, "{} is not a folder", p.display()),
            SocketError::OpenOnTheWay {
                folder,
                trust,
                name,
            } => write!(
                f,
                "{folder} may be written by users other than {trust}, who could replace {} in it",
                name.display()
            ),
            SocketError::OpenFolder {
                folder,
                trust,
                usage,
            } => write!(
                f,
                "the socket folder {folder} may be written by users other than {trust}: {}",
                match usage {
                    FolderUse::Keter => "they could put a socket of their own there",
                    FolderUse::Apps => {
                        "they could put a socket of their own there while the server is down, and apps would send it their passwords"
                    }
                }
            ),
            SocketError::FolderOwner {
                folder,
                owner,
                trust,
            } => write!(f, "{folder} belongs to {owner}, not to {trust}"),
            SocketError::NotSearchable(folder) => write!(
                f,
                "{folder} does not let apps search it (x for others), so they cannot reach the socket"
            ),
            SocketError::NotASocket { path, owner } => write!(
                f,
                "{} is not a socket (it belongs to {owner})",
                path.display()
            ),
            SocketError::SocketOwner {
                path,
                owner,
                held,
                trust,
            } => {
                write!(f, "the socket {} belongs to {owner}", path.display())?;
                if !held.is_empty() {
                    write!(f, ", {}", held.join("; "))?;
                }
                write!(f, "; only {trust} may be the server")
            }
            SocketError::Closed { path, mode } => write!(
                f,
                "the socket {} (mode {mode:04o}) does not let apps connect (w for others; unix_socket_permissions)",
                path.display()
            ),
        }
    }
}

impl std::error::Error for SocketError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            SocketError::Look { source, .. } | SocketError::ReadLink { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Who connects through a socket folder, and so how safe it must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FolderUse {
    /// keter itself, which checks the socket file and the process behind it at every
    /// connection: the folder may be open to others if it is sticky (as `/tmp`), since they
    /// cannot then replace the server's socket while it runs, and a socket of theirs is seen.
    Keter,
    /// The apps, whose drivers check nothing: nobody but root and the server's user may write
    /// the folder, and an app must be able to reach the socket (search every folder on the
    /// way, write the socket).
    Apps,
}

/// Checks the way to the socket folder `path` (module doc) and returns the folder it leads
/// to, symlinks resolved. The message names the folder, its owner and mode, and what is wrong.
pub fn check_folder(path: &Path, trust: &Trust, usage: FolderUse) -> Result<PathBuf, SocketError> {
    if !path.is_absolute() {
        return Err(SocketError::NotAbsolute(path.to_path_buf()));
    }
    let lstat = |p: &Path| {
        fs::symlink_metadata(p).map_err(|source| SocketError::Look {
            path: p.to_path_buf(),
            source,
        })
    };
    // What is left to walk, last component first.
    let mut todo: Vec<PathBuf> = components_reversed(path);
    let mut at = PathBuf::from("/");
    let mut at_meta = lstat(&at)?;
    folder_owned(&at, &at_meta, trust, usage)?;
    let mut hops = 0;
    while let Some(name) = todo.pop() {
        if name.as_os_str() == ".." {
            // `at` was reached from `/` through checked folders, so its parent was checked.
            at.pop();
            at_meta = lstat(&at)?;
            continue;
        }
        let next = at.join(&name);
        let meta = lstat(&next)?;
        if open_to_others(&at_meta, trust) && !(sticky(&at_meta) && trust.uid_ok(meta.uid())) {
            return Err(SocketError::OpenOnTheWay {
                folder: describe(&at, &at_meta),
                trust: trust.to_string(),
                name,
            });
        }
        if meta.file_type().is_symlink() {
            hops += 1;
            if hops > MAX_SYMLINKS {
                return Err(SocketError::TooManySymlinks(path.to_path_buf()));
            }
            let target = fs::read_link(&next).map_err(|source| SocketError::ReadLink {
                path: next.clone(),
                source,
            })?;
            if target.is_absolute() {
                at = PathBuf::from("/");
                at_meta = lstat(&at)?;
            }
            todo.extend(components_reversed(&target));
            continue;
        }
        if !meta.is_dir() {
            return Err(SocketError::NotAFolder(next));
        }
        folder_owned(&next, &meta, trust, usage)?;
        at = next;
        at_meta = meta;
    }
    if open_to_others(&at_meta, trust) && !(usage == FolderUse::Keter && sticky(&at_meta)) {
        return Err(SocketError::OpenFolder {
            folder: describe(&at, &at_meta),
            trust: trust.to_string(),
            usage,
        });
    }
    Ok(at)
}

/// `path`'s components other than the root, last first (so that `pop` walks them in order).
fn components_reversed(path: &Path) -> Vec<PathBuf> {
    let mut parts: Vec<PathBuf> = path
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(PathBuf::from(n)),
            Component::ParentDir => Some(PathBuf::from("..")),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
        })
        .collect();
    parts.reverse();
    parts
}

/// A folder on the way must belong to a trusted user (its owner could open it to anyone),
/// and for apps it must let them through.
fn folder_owned(
    path: &Path,
    meta: &Metadata,
    trust: &Trust,
    usage: FolderUse,
) -> Result<(), SocketError> {
    if !trust.uid_ok(meta.uid()) {
        return Err(SocketError::FolderOwner {
            folder: describe(path, meta),
            owner: user_of(meta.uid()),
            trust: trust.to_string(),
        });
    }
    if usage == FolderUse::Apps && meta.mode() & 0o001 == 0 {
        return Err(SocketError::NotSearchable(describe(path, meta)));
    }
    Ok(())
}

/// Writable by someone neither root nor the server's user: others, or a group not theirs.
fn open_to_others(meta: &Metadata, trust: &Trust) -> bool {
    let mode = meta.mode();
    mode & 0o002 != 0 || (mode & 0o020 != 0 && !trust.gid_ok(meta.gid()))
}

fn sticky(meta: &Metadata) -> bool {
    meta.mode() & 0o1000 != 0
}

/// "/run/postgresql (mode 2775, owner uid 101 (postgres), group 104)".
fn describe(path: &Path, meta: &Metadata) -> String {
    format!(
        "{} (mode {:04o}, owner {}, group {})",
        path.display(),
        meta.mode() & 0o7777,
        user_of(meta.uid()),
        meta.gid()
    )
}

/// Checks that apps may be given the socket folder `folder` for a server on `port`: the
/// folder is safe for them ([`FolderUse::Apps`]) and holds the server's socket, which they may
/// connect to. Returns the folder with its symlinks resolved.
pub fn check_app_socket(folder: &Path, port: u16, trust: &Trust) -> Result<PathBuf, SocketError> {
    let resolved = check_folder(folder, trust, FolderUse::Apps)?;
    let socket = resolved.join(format!(".s.PGSQL.{port}"));
    let meta = fs::symlink_metadata(&socket).map_err(|source| SocketError::Look {
        path: socket.clone(),
        source,
    })?;
    socket_file_ok(&socket, &meta, trust)?;
    if meta.mode() & 0o002 == 0 {
        return Err(SocketError::Closed {
            path: socket,
            mode: meta.mode() & 0o7777,
        });
    }
    Ok(resolved)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn me() -> u32 {
        nix::unistd::geteuid().as_raw()
    }

    #[test]
    fn only_root_and_the_servers_user_are_trusted() {
        let t = Trust::with_ids("postgres", 101, 104);
        assert!(t.uid_ok(0) && t.uid_ok(101));
        assert!(!t.uid_ok(65537) && !t.uid_ok(104));
        assert!(t.gid_ok(0) && t.gid_ok(104) && !t.gid_ok(65537));
        let absent = Trust::resolve("no-such-user-for-keter");
        assert!(absent.uid_ok(0) && !absent.uid_ok(101));
        assert!(absent.to_string().contains("does not exist on this host"));
        assert_eq!(Trust::resolve("0").ids.map(|(u, _)| u), Some(0));
        assert!(t.to_string().contains("postgres (uid 101"), "{t}");
    }

    #[test]
    fn local_addresses_and_the_listeners_that_reach_them() {
        let own = HashSet::from([IpAddr::from([192, 0, 2, 2])]);
        for local in [
            "127.0.0.1",
            "127.0.0.2",
            "::1",
            "0.0.0.0",
            "::",
            "::ffff:127.0.0.1",
            "192.0.2.2",
        ] {
            assert!(is_local(local.parse().unwrap(), &own), "{local}");
        }
        for remote in ["192.0.2.3", "2001:db8::1", "::ffff:192.0.2.3"] {
            assert!(!is_local(remote.parse().unwrap(), &own), "{remote}");
        }
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(reaches(ip("127.0.0.1"), ip("127.0.0.1")));
        assert!(reaches(ip("0.0.0.0"), ip("127.0.0.1")));
        assert!(reaches(ip("::"), ip("127.0.0.1")));
        assert!(reaches(ip("::ffff:127.0.0.1"), ip("127.0.0.1")));
        assert!(reaches(ip("::"), ip("::1")));
        assert!(!reaches(ip("0.0.0.0"), ip("::1")));
        assert!(!reaches(ip("127.0.0.2"), ip("127.0.0.1")));
        assert!(!reaches(ip("::1"), ip("127.0.0.1")));
    }

    #[test]
    fn a_listener_of_another_user_is_refused_and_named_before_anything_is_sent() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = Server::new("127.0.0.1", port).unwrap();
        // Not trusted (unless the test runs as root, who always is): refused, naming the
        // holder. The integration tests do this with an app's user.
        if me() != 0 {
            let stranger = Trust::with_ids("postgres", 4_000_000_000, 4_000_000_000);
            match open(&server, &stranger, Duration::from_secs(5)) {
                Err(OpenError::Untrusted(m)) => {
                    assert!(m.contains(&format!("uid {}", me())), "{m}");
                    assert!(m.contains(&format!("pid {}", std::process::id())), "{m}");
                }
                other => panic!("{other:?}"),
            }
        }
        // Trusted (the test's own uid as the server's user): the connection is handed out,
        // and the listener saw it.
        let trusted = Trust::with_ids("me", me(), 0);
        let (stream, route) = open(&server, &trusted, Duration::from_secs(5)).unwrap();
        assert!(matches!(stream, Stream::Tcp(_)));
        assert_eq!(
            route,
            Route::Local(SocketAddr::from(([127, 0, 0, 1], port)))
        );
        drop(listener);
        match open(&server, &trusted, Duration::from_secs(5)) {
            Err(OpenError::Unreachable(m)) => assert!(m.contains("nothing listens"), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    /// A folder under a fresh temp folder, with `mode`.
    fn folder(base: &Path, name: &str, mode: u32) -> PathBuf {
        let p = base.join(name);
        fs::create_dir_all(&p).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn socket_folders_open_to_others_are_refused_for_apps_and_sticky_ones_kept_for_keter() {
        let base = std::env::temp_dir().join(format!("keter-unit-pgfolder-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        fs::create_dir_all(&base).unwrap();
        fs::set_permissions(&base, fs::Permissions::from_mode(0o755)).unwrap();
        // The test's user owns these folders: trust it as the server's user, with a group
        // nobody has (so group-writable folders count as open).
        let t = Trust::with_ids("me", me(), 4_000_000_000);
        let private = folder(&base, "private", 0o755);
        assert_eq!(
            check_folder(&private, &t, FolderUse::Apps).unwrap(),
            private
        );
        let world = folder(&base, "world", 0o777);
        for usage in [FolderUse::Keter, FolderUse::Apps] {
            let e = check_folder(&world, &t, usage).unwrap_err().to_string();
            assert!(
                e.contains("mode 0777") && e.contains("may be written by users other than"),
                "{e}"
            );
        }
        let group = folder(&base, "group", 0o775);
        if me() == 0 {
            // Root's group is trusted: give it to nogroup.
            std::os::unix::fs::chown(&group, None, Some(65534)).unwrap();
        }
        assert!(check_folder(&group, &t, FolderUse::Apps).is_err());
        let sticky = folder(&base, "sticky", 0o1777);
        assert_eq!(check_folder(&sticky, &t, FolderUse::Keter).unwrap(), sticky);
        assert!(check_folder(&sticky, &t, FolderUse::Apps).is_err());
        // Through a world-writable folder: its entries could be swapped, unless it is sticky
        // and they belong to a trusted user.
        let inside = folder(&world, "inside", 0o755);
        assert!(
            check_folder(&inside, &t, FolderUse::Keter)
                .unwrap_err()
                .to_string()
                .contains("could replace inside")
        );
        let in_sticky = folder(&sticky, "inside", 0o755);
        assert_eq!(
            check_folder(&in_sticky, &t, FolderUse::Apps).unwrap(),
            in_sticky
        );
        // A folder apps cannot search.
        let closed = folder(&base, "closed", 0o750);
        assert!(check_folder(&closed, &t, FolderUse::Keter).is_ok());
        assert!(
            check_folder(&closed, &t, FolderUse::Apps)
                .unwrap_err()
                .to_string()
                .contains("search")
        );
        // Symlinks are followed, and where they point is checked too.
        let link = base.join("link");
        std::os::unix::fs::symlink("world", &link).unwrap();
        assert!(check_folder(&link, &t, FolderUse::Keter).is_err());
        let good_link = base.join("good-link");
        std::os::unix::fs::symlink(&private, &good_link).unwrap();
        assert_eq!(
            check_folder(&good_link, &t, FolderUse::Apps).unwrap(),
            private
        );
        let dotdot = base.join("private/../private");
        assert_eq!(check_folder(&dotdot, &t, FolderUse::Apps).unwrap(), private);
        // Someone else's folder (a stranger as the server's user): refused, naming the owner.
        let stranger = Trust::with_ids("postgres", 4_000_000_000, 4_000_000_000);
        if me() != 0 {
            let e = check_folder(&private, &stranger, FolderUse::Keter)
                .unwrap_err()
                .to_string();
            assert!(e.contains(&format!("belongs to uid {}", me())), "{e}");
        }
        fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn a_socket_folder_keter_cannot_trust_is_refused_before_connecting() {
        let base = std::env::temp_dir().join(format!("keter-unit-pgsock-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        fs::create_dir_all(&base).unwrap();
        fs::set_permissions(&base, fs::Permissions::from_mode(0o755)).unwrap();
        let t = Trust::with_ids("me", me(), 4_000_000_000);
        let ok = folder(&base, "ok", 0o755);
        let listener = std::os::unix::net::UnixListener::bind(ok.join(".s.PGSQL.5999")).unwrap();
        fs::set_permissions(ok.join(".s.PGSQL.5999"), fs::Permissions::from_mode(0o777)).unwrap();
        let server = Server::new(ok.to_str().unwrap(), 5999).unwrap();
        let (stream, route) = open(&server, &t, Duration::from_secs(5)).unwrap();
        assert!(matches!(stream, Stream::Unix(_)));
        assert_eq!(route, Route::Socket(ok.clone()));
        assert_eq!(check_app_socket(&ok, 5999, &t).unwrap(), ok);
        match open(
            &Server::new(ok.to_str().unwrap(), 5998).unwrap(),
            &t,
            Duration::from_secs(5),
        ) {
            Err(OpenError::Unreachable(m)) => assert!(m.contains("is the server running"), "{m}"),
            other => panic!("{other:?}"),
        }
        let open_folder = folder(&base, "open", 0o777);
        let _planted =
            std::os::unix::net::UnixListener::bind(open_folder.join(".s.PGSQL.5999")).unwrap();
        let server = Server::new(open_folder.to_str().unwrap(), 5999).unwrap();
        match open(&server, &t, Duration::from_secs(5)) {
            Err(OpenError::Untrusted(m)) => assert!(m.contains("may be written"), "{m}"),
            other => panic!("{other:?}"),
        }
        drop(listener);
        fs::remove_dir_all(&base).unwrap();
    }
}
