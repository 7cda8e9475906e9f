//! keter: deploys web application bundles on one host behind Nginx.
//!
//! The daemon ([`daemon`]) watches `incoming/` ([`watcher`]), runs one worker thread per app
//! ([`app`]) that unpacks ([`bundle`]), provides a database when asked ([`postgres`]), starts
//! ([`process`]), checks ([`probe`]) and switches Nginx over ([`nginx`]) without a failed
//! request. The README is the contract; `docs/lifecycle.md` describes an app's life inside
//! the daemon.

pub mod acme;
pub mod app;
pub mod applog;
pub mod atomic_file;
pub mod build;
pub mod bundle;
pub mod cgroup;
pub mod childwatch;
pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod dirfd;
pub mod formats;
pub mod fspath;
pub mod handover;
pub mod isolation;
pub mod journal;
pub mod listen;
pub mod logging;
pub mod memory;
pub mod names;
pub mod nginx;
pub mod ports;
pub mod postgres;
pub mod probe;
pub mod problem;
pub mod process;
pub mod procfs;
pub mod report;
pub mod requests;
pub mod responses;
pub mod restart;
pub mod rootlock;
pub mod sockdiag;
pub mod status;
pub mod systemd;
pub mod watcher;
pub mod yaml;
