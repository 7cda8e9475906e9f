//! TCP sockets of this machine by state, from the kernel's sock_diag netlink interface.
//!
//! `/proc/net/tcp` lists every socket including the tens of thousands in TIME_WAIT that a busy
//! proxy leaves behind, and generating it took 40-100 ms here under load; the netlink dump is
//! filtered by state in the kernel, so asking "who listens on port P" or "what is connected to
//! port P" stays cheap whatever the traffic.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;

/// TCP states as the kernel numbers them (`include/net/tcp_states.h`).
pub const ESTABLISHED: u8 = 1;
pub const LISTEN: u8 = 10;

/// One socket: its state, local address and port, remote port, inode and owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Socket {
    pub state: u8,
    /// The address it is bound to (`0.0.0.0` or `::` for every address).
    pub local_addr: IpAddr,
    pub local_port: u16,
    pub remote_port: u16,
    pub inode: u32,
    /// The uid of the process that made it.
    pub uid: u32,
}

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_DONE: u16 = 3;
const NLMSG_ERROR: u16 = 2;

/// `struct nlmsghdr`: length, type, flags, sequence number, port id.
const NLMSG_HDR_LEN: usize = 16;
/// `struct inet_diag_sockid`: ports, addresses, interface, cookie.
const SOCK_ID_LEN: usize = 48;
/// `struct inet_diag_req_v2`: family, protocol, extensions, padding, states, socket id.
const REQ_V2_LEN: usize = 8 + SOCK_ID_LEN;
/// `struct inet_diag_msg` up to `idiag_inode`: family, state, timer, retransmits, socket
/// id, expires, read and write queues, uid, inode.
const DIAG_MSG_LEN: usize = 4 + SOCK_ID_LEN + 20;

// The kernel's structures are written and read field by field at their offsets, never by
// reinterpreting memory: no `unsafe` is needed for their contents, and a message shorter than
// its structure is an error rather than a zero-padded value.

/// The dump request for TCP sockets of `family` in `states` (a bit mask).
fn request(family: u8, states: u32) -> [u8; NLMSG_HDR_LEN + REQ_V2_LEN] {
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
    header(family, states, flags)
}

fn header(family: u8, states: u32, flags: u16) -> [u8; NLMSG_HDR_LEN + REQ_V2_LEN] {
    let mut b = [0u8; NLMSG_HDR_LEN + REQ_V2_LEN];
    let len = b.len() as u32;
    b[0..4].copy_from_slice(&len.to_ne_bytes());
    b[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    b[6..8].copy_from_slice(&flags.to_ne_bytes());
    b[8..12].copy_from_slice(&1u32.to_ne_bytes());
    // Port id 0 at 12..16: the kernel.
    b[16] = family;
    b[17] = libc::IPPROTO_TCP as u8;
    b[20..24].copy_from_slice(&states.to_ne_bytes());
    b
}

/// The request for the one TCP socket whose own address is `local` and whose peer is
/// `remote` (both of one family).
fn lookup_request(local: SocketAddr, remote: SocketAddr) -> [u8; NLMSG_HDR_LEN + REQ_V2_LEN] {
    let family = if local.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    let mut b = header(family as u8, 0, libc::NLM_F_REQUEST as u16);
    let id = NLMSG_HDR_LEN + 8;
    // Ports and addresses in network byte order, as the kernel keeps them.
    b[id..id + 2].copy_from_slice(&local.port().to_be_bytes());
    b[id + 2..id + 4].copy_from_slice(&remote.port().to_be_bytes());
    let octets = |a: IpAddr| match a {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    };
    let src = octets(local.ip());
    let dst = octets(remote.ip());
    b[id + 4..id + 4 + src.len()].copy_from_slice(&src);
    b[id + 20..id + 20 + dst.len()].copy_from_slice(&dst);
    // Interface 0 at id+36; the cookie INET_DIAG_NOCOOKIE: look up by addresses alone.
    b[id + 40..id + 48].copy_from_slice(&[0xff; 8]);
    b
}

/// `N` bytes at `at`, if the buffer holds them.
fn bytes<const N: usize>(buf: &[u8], at: usize) -> Option<[u8; N]> {
    buf.get(at..at.checked_add(N)?)?.try_into().ok()
}

fn u16_at(buf: &[u8], at: usize) -> Option<u16> {
    bytes(buf, at).map(u16::from_ne_bytes)
}

fn u32_at(buf: &[u8], at: usize) -> Option<u32> {
    bytes(buf, at).map(u32::from_ne_bytes)
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

/// Reads the messages of one datagram into `out`. `Ok(true)` once the dump is done.
fn parse(buf: &[u8], out: &mut Vec<Socket>) -> io::Result<bool> {
    let mut at = 0usize;
    while at + NLMSG_HDR_LEN <= buf.len() {
        let len = u32_at(buf, at).ok_or_else(|| invalid("short netlink header"))? as usize;
        let kind = u16_at(buf, at + 4).ok_or_else(|| invalid("short netlink header"))?;
        if len < NLMSG_HDR_LEN || at + len > buf.len() {
            return Err(invalid("short netlink message"));
        }
        let msg = &buf[at..at + len];
        let payload = NLMSG_HDR_LEN;
        match kind {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                let code = bytes::<4>(msg, payload)
                    .map(i32::from_ne_bytes)
                    .ok_or_else(|| invalid("short netlink error message"))?;
                return Err(io::Error::from_raw_os_error(-code));
            }
            SOCK_DIAG_BY_FAMILY if len >= payload + DIAG_MSG_LEN => {
                let family = msg[payload];
                let state = msg[payload + 1];
                let id = payload + 4;
                // Ports and addresses are in network byte order; an IPv4 address takes the
                // first 4 of the 16 bytes.
                let local_port = bytes(msg, id).map(u16::from_be_bytes);
                let remote_port = bytes(msg, id + 2).map(u16::from_be_bytes);
                let local_addr = match i32::from(family) {
                    libc::AF_INET => bytes::<4>(msg, id + 4).map(IpAddr::from),
                    _ => bytes::<16>(msg, id + 4).map(IpAddr::from),
                };
                let uid = u32_at(msg, payload + 4 + SOCK_ID_LEN + 12);
                let inode = u32_at(msg, payload + 4 + SOCK_ID_LEN + 16);
                if let (
                    Some(local_addr),
                    Some(local_port),
                    Some(remote_port),
                    Some(inode),
                    Some(uid),
                ) = (local_addr, local_port, remote_port, inode, uid)
                {
                    out.push(Socket {
                        state,
                        local_addr,
                        local_port,
                        remote_port,
                        inode,
                        uid,
                    });
                }
            }
            _ => {}
        }
        // Messages are aligned to 4 bytes.
        at += (len + 3) & !3;
    }
    Ok(false)
}

/// Every IPv4 and IPv6 TCP socket in one of `states` (a list of the constants above).
pub fn tcp_sockets(states: &[u8]) -> io::Result<Vec<Socket>> {
    let mask = states.iter().fold(0u32, |m, s| m | (1 << s));
    let mut out = Vec::new();
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        dump(family, mask, &mut out)?;
    }
    Ok(out)
}

fn dump(family: u8, states: u32, out: &mut Vec<Socket>) -> io::Result<()> {
    exchange(&request(family, states), false, out)
}

/// The uid that owns the TCP socket of this machine whose own address is `local` and whose
/// peer is `remote`; `None` when there is none (the peer is another machine, or gone). The
/// status interface asks this about the other end of each connection it accepts.
pub fn tcp_socket_uid(local: SocketAddr, remote: SocketAddr) -> io::Result<Option<u32>> {
    // A dual-stack listener sees an IPv4 peer as ::ffff:a.b.c.d, but the peer's own socket
    // is an IPv4 one.
    let plain = |a: SocketAddr| match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::from((v4, v6.port())),
            None => a,
        },
        v4 => v4,
    };
    let (local, remote) = (plain(local), plain(remote));
    if local.is_ipv4() != remote.is_ipv4() {
        return Ok(None);
    }
    let mut out = Vec::new();
    match exchange(&lookup_request(local, remote), true, &mut out) {
        Ok(()) => Ok(out.first().map(|s| s.uid)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Sends one request and reads its answer into `out`: until the end of a dump, or the one
/// socket a `single` lookup answers.
fn exchange(request: &[u8], single: bool, out: &mut Vec<Socket>) -> io::Result<()> {
    use nix::sys::socket::{
        AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, recv, sendto,
        socket,
    };
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkSockDiag,
    )?;
    let raw = fd.as_raw_fd();
    // Addressed to the kernel (pid 0).
    sendto(raw, request, &NetlinkAddr::new(0, 0), MsgFlags::empty())?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match recv(raw, &mut buf, MsgFlags::empty()) {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        };
        // A lookup is answered by one message and no NLMSG_DONE.
        if parse(&buf[..n], out)? || single {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A netlink message of `kind` with `payload`.
    fn message(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend(((NLMSG_HDR_LEN + payload.len()) as u32).to_ne_bytes());
        m.extend(kind.to_ne_bytes());
        m.extend([0u8; 10]);
        m.extend(payload);
        while m.len() % 4 != 0 {
            m.push(0);
        }
        m
    }

    #[test]
    fn messages_are_read_field_by_field_and_short_ones_are_refused() {
        let mut diag = vec![0u8; DIAG_MSG_LEN];
        diag[0] = libc::AF_INET as u8;
        diag[1] = LISTEN;
        diag[4..6].copy_from_slice(&8080u16.to_be_bytes());
        diag[8..12].copy_from_slice(&[127, 0, 0, 1]);
        diag[4 + SOCK_ID_LEN + 16..4 + SOCK_ID_LEN + 20].copy_from_slice(&77u32.to_ne_bytes());
        let mut buf = message(SOCK_DIAG_BY_FAMILY, &diag);
        buf.extend(message(NLMSG_DONE, &[0; 4]));
        let mut out = Vec::new();
        assert!(parse(&buf, &mut out).unwrap());
        assert_eq!(
            out,
            [Socket {
                state: LISTEN,
                local_addr: IpAddr::from([127, 0, 0, 1]),
                local_port: 8080,
                remote_port: 0,
                inode: 77,
                uid: 0
            }]
        );
        // An error message must carry its whole error code; two bytes of it are not
        // "success" padded with zeros.
        let short = message(NLMSG_ERROR, &(-libc::EPERM).to_ne_bytes()[..2]);
        let e = parse(&short, &mut out).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        let full = message(NLMSG_ERROR, &(-libc::EPERM).to_ne_bytes());
        let e = parse(&full, &mut out).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPERM));
    }

    #[test]
    fn sees_a_listener_and_a_connection() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let listening = tcp_sockets(&[LISTEN]).unwrap();
        assert!(listening.iter().any(|s| s.local_port == port
            && s.state == LISTEN
            && s.local_addr == IpAddr::from([127, 0, 0, 1])));
        let v6 = std::net::TcpListener::bind("[::1]:0").unwrap();
        let v6_port = v6.local_addr().unwrap().port();
        let listening = tcp_sockets(&[LISTEN]).unwrap();
        assert!(listening.iter().any(|s| s.local_port == v6_port
            && s.local_addr == IpAddr::from([0, 0, 0, 0, 0, 0, 0, 1u16])));
        let _client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (_server, _) = listener.accept().unwrap();
        let established = tcp_sockets(&[ESTABLISHED]).unwrap();
        assert!(
            established
                .iter()
                .any(|s| s.local_port == port && s.remote_port != 0)
        );
        assert!(established.iter().any(|s| s.remote_port == port));
        assert!(established.iter().all(|s| s.state == ESTABLISHED));
    }

    #[test]
    fn finds_the_owner_of_the_other_end_of_a_connection() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, peer) = listener.accept().unwrap();
        let local = server.local_addr().unwrap();
        assert_eq!(client.local_addr().unwrap(), peer);
        let me = nix::unistd::geteuid().as_raw();
        assert_eq!(tcp_socket_uid(peer, local).unwrap(), Some(me));
        let nobody = SocketAddr::from(([127, 0, 0, 1], 1));
        assert_eq!(tcp_socket_uid(nobody, local).unwrap(), None);
    }
}
