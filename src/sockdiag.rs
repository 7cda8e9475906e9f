//! TCP sockets of this machine by state, from the kernel's sock_diag netlink interface.
//!
//! `/proc/net/tcp` lists every socket including the tens of thousands in TIME_WAIT that a busy
//! proxy leaves behind, and generating it took 40-100 ms here under load; the netlink dump is
//! filtered by state in the kernel, so asking "who listens on port P" or "what is connected to
//! port P" stays cheap whatever the traffic.

use std::io;
use std::mem::size_of;
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
            flags: (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16,
            seq: 1,
            pid: 0,
        },
        req: ReqV2 {
            family,
            protocol: libc::IPPROTO_TCP as u8,
            states,
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
                    return Err(io::Error::from_raw_os_error(-code));
                }
                SOCK_DIAG_BY_FAMILY if len >= size_of::<NlMsgHdr>() + size_of::<DiagMsg>() => {
                    let msg: DiagMsg = read_struct(&buf[at + size_of::<NlMsgHdr>()..]);
                    out.push(Socket {
                        state: msg.state,
                        local_port: u16::from_be_bytes(msg.id.sport),
                        remote_port: u16::from_be_bytes(msg.id.dport),
                        inode: msg.inode,
                    });
                }
                _ => {}
            }
            // Messages are aligned to 4 bytes.
            at += (len + 3) & !3;
        }
    }
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
}
