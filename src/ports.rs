//! The port pool: the one owner of which local ports apps get.
//!
//! A port is handed out only if keter does not hold it already and nothing else is listening
//! on it (Piku #125 picked ports by bind-then-close and raced other processes; Keter #324 never
//! returned ports). Every exit path of an app returns its port with [`PortPool::release`].

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::ops::RangeInclusive;
use std::sync::Mutex;
use std::time::Duration;

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
}
