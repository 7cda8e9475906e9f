//! Who is at the other end of a status connection: the uid of the local process that
//! connected (`SO_PEERCRED` on the unix socket; on TCP, the owner of the connecting socket,
//! from the kernel's sock_diag), so that the status interface can refuse apps and Nginx's
//! workers as soon as it accepts the connection (README "Status interface": it never shows one
//! app's output to another, nor to the internet through Nginx).

use std::net::{IpAddr, SocketAddr};

use tokio::net::{TcpStream, UnixStream};

/// The other end of one connection.
#[derive(Debug, Clone)]
pub enum Peer {
    /// A process of this machine running as this uid.
    Uid(u32),
    /// No socket of this machine: another machine (the status address is not loopback).
    Remote(SocketAddr),
    /// Nobody can tell (the lookup failed); such a connection is refused.
    Unknown(String),
}

/// What the limit of connections per peer counts by: the uid of a local peer, the address of
/// another machine.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PeerKey {
    Uid(u32),
    Ip(IpAddr),
    Unknown,
}

impl Peer {
    /// The peer of a TCP connection just accepted.
    pub fn of_tcp(stream: &TcpStream) -> Peer {
        let (local, remote) = match (stream.local_addr(), stream.peer_addr()) {
            (Ok(l), Ok(r)) => (l, r),
            (Err(e), _) | (_, Err(e)) => return Peer::Unknown(e.to_string()),
        };
        // One netlink request and its answer: microseconds, no waiting on anything.
        match crate::sockdiag::tcp_socket_uid(remote, local) {
            Ok(Some(uid)) => Peer::Uid(uid),
            // The connecting socket is still open while keter accepts it: a local peer is
            // always found, so an address of this machine without one is never trusted.
            Ok(None) if !remote.ip().is_loopback() && remote.ip() != local.ip() => {
                Peer::Remote(remote)
            }
            Ok(None) => Peer::Unknown(format!("no local socket connects from {remote}")),
            Err(e) => Peer::Unknown(format!("cannot look up {remote}: {e}")),
        }
    }

    /// The peer of a connection to the unix socket just accepted.
    pub fn of_unix(stream: &UnixStream) -> Peer {
        match stream.peer_cred() {
            Ok(cred) => Peer::Uid(cred.uid()),
            Err(e) => Peer::Unknown(e.to_string()),
        }
    }

    pub fn key(&self) -> PeerKey {
        match self {
            Peer::Uid(uid) => PeerKey::Uid(*uid),
            Peer::Remote(a) => PeerKey::Ip(a.ip()),
            Peer::Unknown(_) => PeerKey::Unknown,
        }
    }
}
