//! The global `status` key: where the status web interface listens (README, "Global
//! configuration" and "Status interface").
//!
//! `HOST:PORT` (an IP address; loopback by default), a unix socket path (anything with a `/`,
//! relative to the config file's folder), `true` for the default, or `false` to serve nothing.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::problem::Problems;

/// Where the status interface listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StatusAddress {
    Tcp(SocketAddr),
    /// An absolute socket path of at most 107 bytes (`sun_path`).
    Unix(PathBuf),
}

/// `127.0.0.1:4080`, the default.
pub const DEFAULT: StatusAddress =
    StatusAddress::Tcp(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 4080));

impl fmt::Display for StatusAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StatusAddress::Tcp(a) => write!(f, "http://{a}/"),
            StatusAddress::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

const EXPECTED: &str = "expected HOST:PORT with an IP address (for example 127.0.0.1:4080), \
                        the path of a unix socket, or false";

/// Reads the `status` value (`None` when the key is absent). Returns `None` for "disabled".
pub fn read(value: Option<&Value>, base: &Path, problems: &mut Problems) -> Option<StatusAddress> {
    let parsed = match value {
        None | Some(Value::Bool(true)) => Ok(DEFAULT),
        Some(Value::Bool(false)) => return None,
        Some(Value::String(s)) => parse(s, base),
        Some(_) => Err(AddressError::NotAString),
    };
    match parsed {
        Ok(StatusAddress::Tcp(a)) if !a.ip().is_loopback() => {
            problems.warn(
                "status",
                format!(
                    "{a} is not a loopback address: everyone who can reach it sees every app's \
                     state and recent log lines (the status interface has no login)"
                ),
            );
            Some(StatusAddress::Tcp(a))
        }
        Ok(a) => Some(a),
        Err(e) => {
            problems.error("status", e);
            Some(DEFAULT)
        }
    }
}

/// Why a `status` value is not an address.
#[derive(Debug)]
enum AddressError {
    /// Neither a string nor a boolean.
    NotAString,
    /// A socket path longer than `sun_path` holds.
    TooLong(PathBuf),
    /// Not `HOST:PORT` with an IP address.
    NotAnAddress {
        text: String,
        source: std::net::AddrParseError,
    },
}

impl fmt::Display for AddressError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AddressError::NotAString => f.write_str(EXPECTED),
            AddressError::TooLong(path) => write!(
                f,
                "{} is too long a path for a unix socket (at most 107 bytes)",
                path.display()
            ),
            AddressError::NotAnAddress { text, .. } => write!(f, "{text:?}: {EXPECTED}"),
        }
    }
}

impl std::error::Error for AddressError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            AddressError::NotAnAddress { source, .. } => Some(source),
            _ => None,
        }
    }
}

fn parse(text: &str, base: &Path) -> Result<StatusAddress, AddressError> {
    let text = text.trim();
    if text.contains('/') {
        let path = crate::fspath::normalize(&base.join(text));
        // sun_path holds 108 bytes including the terminating NUL.
        if path.as_os_str().len() > 107 {
            return Err(AddressError::TooLong(path));
        }
        return Ok(StatusAddress::Unix(path));
    }
    let addr = match text.strip_prefix("localhost:") {
        Some(port) => format!("127.0.0.1:{port}"),
        None => text.to_string(),
    };
    addr.parse::<SocketAddr>()
        .map(StatusAddress::Tcp)
        .map_err(|source| AddressError::NotAnAddress {
            text: text.to_string(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_str(yaml: &str) -> (Option<StatusAddress>, Problems) {
        let mut problems = Problems::new("keter-config.yaml");
        let value = crate::yaml::parse(yaml).unwrap();
        let a = read(Some(&value), Path::new("/etc/keter"), &mut problems);
        (a, problems)
    }

    #[test]
    fn reads_every_form() {
        assert_eq!(
            read_str("127.0.0.1:9000").0,
            Some("127.0.0.1:9000".parse().map(StatusAddress::Tcp).unwrap())
        );
        assert_eq!(read_str("localhost:9000").0, read_str("127.0.0.1:9000").0);
        assert_eq!(
            read_str("'[::1]:9000'").0,
            Some(StatusAddress::Tcp("[::1]:9000".parse().unwrap()))
        );
        assert_eq!(
            read_str("run/status.sock").0,
            Some(StatusAddress::Unix("/etc/keter/run/status.sock".into()))
        );
        assert_eq!(read_str("false").0, None);
        assert_eq!(read_str("true").0, Some(DEFAULT));
        let mut problems = Problems::new("keter-config.yaml");
        assert_eq!(read(None, Path::new("/"), &mut problems), Some(DEFAULT));
    }

    #[test]
    fn reports_bad_and_open_addresses() {
        let (_, p) = read_str("example.com:80");
        assert_eq!(p.errors.len(), 1);
        assert_eq!(p.errors[0].key, "status");
        let (_, p) = read_str("[1, 2]");
        assert_eq!(p.errors.len(), 1);
        let (a, p) = read_str("0.0.0.0:4080");
        assert!(a.is_some());
        assert!(p.errors.is_empty());
        assert_eq!(p.warnings.len(), 1, "{:?}", p.warnings);
        let long = format!("/{}", "x".repeat(120));
        assert_eq!(read_str(&long).1.errors.len(), 1);
    }
}
