//! The status interface (README, "Status interface"): a read-only web server inside the daemon with an HTML
//! overview of every app, a page per app with its recent output and Nginx file, the same
//! facts as JSON under `/api/apps`, and Prometheus metrics at `/metrics`; and the client side
//! that `keter status` uses to read the API of a running daemon.

pub mod address;
pub mod client;
pub mod conn;
pub mod metrics;
pub mod pages;
pub mod peer;
pub mod server;

pub use address::StatusAddress;
pub use server::StatusServer;
