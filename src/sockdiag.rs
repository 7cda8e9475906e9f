//! TCP sockets of this machine by state, from the kernel's sock_diag netlink interface.
//!
//! `/proc/net/tcp` lists every socket including the tens of thousands in TIME_WAIT that a busy
//! proxy leaves behind, and generating it took 40-100 ms here under load; the netlink dump is
//! filtered by state in the kernel, so asking "who listens on port P" or "what is connected to
//! port P" stays cheap whatever the traffic.

use std::io;
use std::mem::size_of;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// TCP states as the kernel numbers them (`include/net/tcp_states.h`).
pub const ESTABLISHED: u8 = 1;
pub const LISTEN: u8 = 10;

/// One socket: its state, local and remote ports and inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Socket {
    pub state: u8,
    pub local_port: u16,
    pub remote_port: u16,
    pub inode: u32,
}

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_DONE: u16 = 3;
const NLMSG_ERROR: u16 = 2;

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct NlMsgHdr {
    len: u32,
    kind: u16,
    flags: u16,
    seq: u32,
    pid: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct SockId {
    sport: [u8; 2],
    dport: [u8; 2],
    src: [u32; 4],
    dst: [u32; 4],
    interface: u32,
    cookie: [u32; 2],
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct ReqV2 {
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    id: SockId,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct DiagMsg {
    family: u8,
    state: u8,
    timer: u8,
    retrans: u8,
    id: SockId,
    expires: u32,
    rqueue: u32,
    wqueue: u32,
    uid: u32,
    inode: u32,
}

#[repr(C)]
struct Request {
    hdr: NlMsgHdr,
    req: ReqV2,
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
    exchange(
        family,
        states,
        SockId::default(),
        (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16,
        &mut |msg: &DiagMsg| {
            out.push(Socket {
                state: msg.state,
                local_port: u16::from_be_bytes(msg.id.sport),
                remote_port: u16::from_be_bytes(msg.id.dport),
                inode: msg.inode,
            })
        },
    )
}

/// Sends one sock_diag request and hands every socket of the answer to `each`.
fn exchange(
    family: u8,
    states: u32,
    id: SockId,
    flags: u16,
    each: &mut dyn FnMut(&DiagMsg),
) -> io::Result<()> {
    // SAFETY: plain socket(2) call; the descriptor is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let raw = fd.as_raw_fd();
    let request = Request {
        hdr: NlMsgHdr {
            len: size_of::<Request>() as u32,
            kind: SOCK_DIAG_BY_FAMILY,
            flags,
            seq: 1,
            pid: 0,
        },
        req: ReqV2 {
            family,
            protocol: libc::IPPROTO_TCP as u8,
            states,
            id,
            ..ReqV2::default()
        },
    };
    // SAFETY: a zeroed sockaddr_nl addressed to the kernel (pid 0).
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as u16;
    // SAFETY: the buffer is the request struct, valid for its size; addr is a valid sockaddr_nl.
    let sent = unsafe {
        libc::sendto(
            raw,
            (&request as *const Request).cast(),
            size_of::<Request>(),
            0,
            (&addr as *const libc::sockaddr_nl).cast(),
            size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let dump = flags & libc::NLM_F_DUMP as u16 != 0;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: buf is valid for writes of its length.
        let n = unsafe { libc::recv(raw, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let mut at = 0usize;
        let n = n as usize;
        while at + size_of::<NlMsgHdr>() <= n {
            let hdr: NlMsgHdr = read_struct(&buf[at..]);
            let len = hdr.len as usize;
            if len < size_of::<NlMsgHdr>() || at + len > n {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "short netlink message",
                ));
            }
            match hdr.kind {
                NLMSG_DONE => return Ok(()),
                NLMSG_ERROR => {
                    let code: i32 = read_struct(&buf[at + size_of::<NlMsgHdr>()..]);
                    if code == 0 {
                        return Ok(());
                    }
                    return Err(io::Error::from_raw_os_error(-code));
                }
                SOCK_DIAG_BY_FAMILY if len >= size_of::<NlMsgHdr>() + size_of::<DiagMsg>() => {
                    let msg: DiagMsg = read_struct(&buf[at + size_of::<NlMsgHdr>()..]);
                    each(&msg);
                    // A single lookup answers one message and no NLMSG_DONE.
                    if !dump {
                        return Ok(());
                    }
                }
                _ => {}
            }
            // Messages are aligned to 4 bytes.
            at += (len + 3) & !3;
        }
    }
}

/// `INET_DIAG_NOCOOKIE`: look a socket up by its addresses alone.
const NO_COOKIE: [u32; 2] = [u32::MAX, u32::MAX];

/// The uid that owns the TCP socket of this machine whose own address is `local` and whose
/// peer is `remote` (`None` when there is none: the peer is on another machine, or gone).
/// The status interface asks this about the other end of each connection it accepts.
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
    let (family, src, dst) = match (local.ip(), remote.ip()) {
        (IpAddr::V4(l), IpAddr::V4(r)) => (libc::AF_INET, words(&l.octets()), words(&r.octets())),
        (IpAddr::V6(l), IpAddr::V6(r)) => {
            (libc::AF_INET6, words(&l.octets()), words(&r.octets()))
        }
        _ => return Ok(None),
    };
    let id = SockId {
        sport: local.port().to_be_bytes(),
        dport: remote.port().to_be_bytes(),
        src,
        dst,
        interface: 0,
        cookie: NO_COOKIE,
    };
    let mut found = None;
    let result = exchange(
        family as u8,
        0,
        id,
        libc::NLM_F_REQUEST as u16,
        &mut |msg: &DiagMsg| found = Some(msg.uid),
    );
    match result {
        Ok(()) => Ok(found),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// An address as the kernel's `__be32[4]`: its bytes in network order.
fn words(octets: &[u8]) -> [u32; 4] {
    let mut out = [0u32; 4];
    for (i, chunk) in octets.chunks(4).enumerate() {
        let mut b = [0u8; 4];
        b[..chunk.len()].copy_from_slice(chunk);
        out[i] = u32::from_ne_bytes(b);
    }
    out
}

/// Copies a plain-data struct out of a byte buffer (which may be unaligned).
fn read_struct<T: Copy + Default>(bytes: &[u8]) -> T {
    let mut value = T::default();
    let size = size_of::<T>().min(bytes.len());
    // SAFETY: T is a repr(C) plain-data type (integers and arrays only); at most size_of::<T>()
    // bytes are copied into it, and any bit pattern is valid for it.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), (&mut value as *mut T).cast::<u8>(), size);
    }
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sees_a_listener_and_a_connection() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let listening = tcp_sockets(&[LISTEN]).unwrap();
        assert!(
            listening
                .iter()
                .any(|s| s.local_port == port && s.state == LISTEN)
        );
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
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        assert_eq!(tcp_socket_uid(peer, local).unwrap(), Some(me));
        assert_eq!(client.local_addr().unwrap(), peer);
        drop(client);
        let gone = SocketAddr::from(([127, 0, 0, 1], 1));
        assert_eq!(tcp_socket_uid(gone, local).unwrap(), None);
    }
}
