//! Which keter this is: the package version and the build (`build.rs`: the git commit and
//! whether the tree had changes, or what the builder named it). `keter --version`, the
//! daemon's first log line, the status API and pages and the handover all say it, so that an
//! upgrade shows.

/// The package version.
pub const PACKAGE: &str = env!("CARGO_PKG_VERSION");
/// The build, e.g. `git 1a2b3c4d5e` or `git 1a2b3c4d5e, modified`.
pub const BUILD: &str = env!("KETER_BUILD");
/// Both, e.g. `0.1.0 (git 1a2b3c4d5e)`.
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (", env!("KETER_BUILD"), ")");
