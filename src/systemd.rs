//! Telling systemd how the service is doing (`sd_notify`): `READY=1` once keter watches
//! `incoming/` (the unit is `Type=notify`, so `systemctl start` returns when keter serves),
//! `RELOADING=1` when an in-place upgrade begins and `READY=1` again from the new image, and
//! `STOPPING=1` at shutdown. Without systemd (`NOTIFY_SOCKET` unset) nothing is sent.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// Sends `state` (`KEY=VALUE` lines) to systemd's notification socket, if there is one.
/// Best effort: a failure is logged at debug level only.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = (|| -> std::io::Result<()> {
        let bytes = path.as_encoded_bytes();
        let addr = match bytes.strip_prefix(b"@") {
            // An abstract socket.
            Some(name) => SocketAddr::from_abstract_name(name)?,
            None => SocketAddr::from_pathname(std::path::Path::new(&path))?,
        };
        let socket = UnixDatagram::unbound()?;
        socket.send_to_addr(state.as_bytes(), &addr)?;
        Ok(())
    })();
    if let Err(e) = sent {
        log::debug!("cannot notify systemd ({state}): {e}");
    }
}
