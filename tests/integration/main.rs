//! Integration tests: the real `keter` binary, a real Nginx (keter's managed one, or one that
//! stands in for the host's in system mode), a real PostgreSQL, real bundles and real HTTP
//! requests. One test binary; each test has its own root folder and ports.

mod pebble;
mod ssh_hosts;
mod support;

mod acme;
mod acme_stanzas;
mod attacks;
mod commands;
mod craft;
mod deploy_loop;
mod fd_store;
mod formats;
mod health;
mod hostile;
mod isolation;
mod keter_configs;
mod keter_front;
mod limits;
mod matrix;
mod metrics;
mod neighbours;
mod nginx_files;
mod postgres;
mod releases;
mod several_hosts;
mod stanzas;
mod status;
mod supervision;
mod system_mode;
mod takeover;
mod traffic;
