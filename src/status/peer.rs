//! Who is at the other end of a status connection: the uid of the local process that
//! connected (`SO_PEERCRED` on the unix socket; on TCP, the owner of the connecting socket,
//! from the kernel's sock_diag), so that the status interface can refuse apps (README
//! "Status interface": it never shows one app's output to another).

use std::net::SocketAddr;

use axum::extract::connect_info::Connected;
use axum::serve::IncomingStream;
use tokio::net::{TcpListener, UnixListener};

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

impl Connected<IncomingStream<'_, TcpListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, TcpListener>) -> Peer {
        let io = stream.io();
        let (local, remote) = match (io.local_addr(), io.peer_addr()) {
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
}

impl Connected<IncomingStream<'_, UnixListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, UnixListener>) -> Peer {
        match stream.io().peer_cred() {
            Ok(cred) => Peer::Uid(cred.uid()),
            Err(e) => Peer::Unknown(e.to_string()),
        }
    }
}
