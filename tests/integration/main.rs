//! Integration tests: the real `keter` binary, a real managed Nginx, real bundles and real
//! HTTP requests. One test binary; each test has its own root folder and ports.

mod support;

mod commands;
mod deploy_loop;
mod status;
mod supervision;
