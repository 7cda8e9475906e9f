//! Certificates obtained and renewed over ACME (RFC 8555) for the hosts that ask, through the
//! HTTP-01 challenge answered from keter's ACME webroot. `docs/acme.md` is the design note.
//!
//! * [`config`]: the global `acme` section (CA directory, contact, terms, private roots,
//!   retry timings);
//! * [`hosts`]: the host set of one certificate (wildcards refused);
//! * [`manager`]: the ACME thread, the one owner of certificate state, and its handle
//!   [`Acme`] that the app workers call;
//! * [`schedule`]: when each set is obtained, renewed or retried, and its [`CertStatus`];
//! * [`client`]: one attempt with the `instant-acme` client; [`error`]: why it failed;
//! * [`store`] and [`certificate`]: the files under `ROOT/etc/acme/`; [`challenge`]: the
//!   answers in the webroot.

pub mod certificate;
pub mod challenge;
pub mod client;
pub mod config;
pub mod error;
pub mod hosts;
pub mod manager;
pub mod schedule;
pub mod store;

pub use certificate::Certificate;
pub use config::AcmeConfig;
pub use error::{AcmeError, ErrorKind};
pub use hosts::HostSet;
pub use manager::{Acme, Clock, SystemClock};
pub use schedule::{CertState, CertStatus, LastError};
