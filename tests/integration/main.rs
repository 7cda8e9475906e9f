//! Integration tests: the real `keter` binary, a real Nginx (keter's managed one, or one that
//! stands in for the host's in system mode), a real PostgreSQL, real bundles and real HTTP
//! requests. One test binary; each test has its own root folder and ports.

mod support;

mod commands;
mod craft;
mod deploy_loop;
mod hostile;
mod isolation;
mod postgres;
mod stanzas;
mod status;
mod supervision;
mod system_mode;
