//! The commands that do not run the daemon: `check`, `render`, `bundle` and `status`. Each
//! prints what it found and returns the exit code: 0 for success, 1 for problems found or a
//! daemon that could not be reached.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::app::{SiteSource, site_of};
use crate::bundle::Tls;
use crate::bundle::{self, BundleConfig};
use crate::config::{self, BundleLimits, Config};
use crate::names::{AppName, Host};
use crate::nginx::{CertFiles, Renderer};
use crate::problem::Problem;
use crate::status::client;

/// `keter check PATH [-c CONFIG]`.
pub fn check(path: &Path, config_path: Option<&Path>) -> ExitCode {
    let is_bundle = is_bundle_dir(path) || path.extension().is_some_and(|e| e == "keter");
    let (errors, warnings) = if is_bundle {
        // A bundle is checked as a deploy on this host would check it: against the daemon's
        // configuration. Problems of that configuration are not the bundle's and only warn.
        let scratch = match Scratch::new("check") {
            Ok(s) => s,
            Err(e) => return fail(&e),
        };
        let (config, mut notes) = match load_config(config_path, &scratch.0) {
            Ok((c, _)) => (Some(c), Vec::new()),
            Err(errors) => (
                None,
                errors
                    .into_iter()
                    .map(|e| format!("{e} (the bundle is checked against keter's defaults)"))
                    .collect(),
            ),
        };
        let config = match config {
            Some(c) => c,
            None => match Config::check(&scratch.0) {
                (Some(c), _) => c,
                (None, p) => return fail_with(&strings(&p.errors), "keter's defaults"),
            },
        };
        let ctx = bundle::Context::of(&config);
        match Opened::bundle(path, &ctx, &config.limits) {
            Ok(b) => {
                let (errors, mut warnings) = b.check_result();
                warnings.append(&mut notes);
                (errors, warnings)
            }
            Err(errors) => (errors, notes),
        }
    } else {
        let (_, problems) = Config::check(path);
        (strings(&problems.errors), strings(&problems.warnings))
    };
    print_problems(&errors, &warnings);
    if errors.is_empty() {
        println!("{}: OK", path.display());
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// `keter render BUNDLE [-c CONFIG]`.
pub fn render(bundle_path: &Path, config_path: Option<&Path>) -> ExitCode {
    let scratch = match Scratch::new("render") {
        Ok(s) => s,
        Err(e) => return fail(&e),
    };
    let (config, config_note) = match load_config(config_path, &scratch.0) {
        Ok(c) => c,
        Err(errors) => return fail_with(&errors, "the configuration has errors"),
    };
    let opened = match Opened::bundle(bundle_path, &bundle::Context::of(&config), &config.limits) {
        Ok(b) => b,
        Err(errors) => return fail_with(&errors, "the bundle cannot be read"),
    };
    let (errors, warnings) = opened.check_result();
    let (Some(app), Some(bundle_config), true) = (
        opened.app.clone(),
        opened.config.as_ref(),
        errors.is_empty(),
    ) else {
        return fail_with(&errors, "the bundle has errors");
    };
    for w in &warnings {
        eprintln!("warning: {w}");
    }
    let renderer = match Renderer::new(&config) {
        Ok(r) => r,
        Err(e) => return fail(&e.to_string()),
    };
    let first = *config.port_range.start();
    let last = *config.port_range.end();
    let ports: Vec<(usize, u16)> = (0..bundle_config.webapps.len())
        .map(|i| (i, first.saturating_add(i as u16).min(last)))
        .collect();
    let sha256 = opened
        .sha256
        .clone()
        .unwrap_or_else(|| "none (rendered from a folder, not a bundle file)".into());
    // Certificates are shown where they are (checked already); the daemon copies them out.
    // An `ssl: acme` stanza is shown as it is served before its certificate exists.
    let mut acme_stanzas: Vec<String> = Vec::new();
    let mut certs = |tls: &Tls, _hosts: &[Host], origin: &str| -> Result<Option<CertFiles>, _> {
        match tls {
            Tls::Acme => {
                acme_stanzas.push(origin.to_string());
                Ok(None)
            }
            Tls::Own {
                key, certificate, ..
            } => Ok(Some(CertFiles {
                certificate: certificate.clone(),
                key: key.clone(),
            })),
            _ => Ok(None),
        }
    };
    let source = SiteSource {
        app: &app,
        bundle: bundle_config,
        sha256: &sha256,
        deploy: 0,
        ports: &ports,
    };
    let site = match site_of(&config, &source, &mut certs) {
        Ok(s) => s,
        Err(e) => return fail(&e),
    };
    match renderer.app_conf(&site, 0) {
        Ok(text) => {
            println!(
                "# Rendered by `keter render` for review; nothing was deployed.\n\
                 # The upstream ports are placeholders from the start of port-range ({first}-{last}):\n\
                 # keter picks free ports when it deploys. Deploy and generation numbers are 0.\n\
                 # Configuration: {config_note}.\n"
            );
            if !acme_stanzas.is_empty() {
                println!(
                    "# {}: acme. Shown as served before the certificate exists (plain HTTP, no\n\
                     # redirect); once obtained, TLS server blocks with it are added.\n",
                    acme_stanzas.join(", ")
                );
            }
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e.to_string()),
    }
}

/// `keter bundle DIR [-o OUT]`.
pub fn bundle(dir: &Path, out: Option<&Path>) -> ExitCode {
    if !is_bundle_dir(dir) {
        return fail(&format!(
            "{} is not a bundle folder: it has no config/ folder with keter.yaml",
            dir.display()
        ));
    }
    // Packing happens on a build machine: what only the deployment host has is left to it.
    let ctx = bundle::Context::default();
    let (_, problems) = bundle::check_config(dir, &dir.display().to_string(), &ctx);
    let (errors, warnings) = (strings(&problems.errors), strings(&problems.warnings));
    print_problems(&errors, &warnings);
    if !errors.is_empty() {
        eprintln!(
            "keter: {} was not packed: fix the errors above",
            dir.display()
        );
        return ExitCode::from(1);
    }
    let out = match out {
        Some(o) => o.to_path_buf(),
        None => {
            let name = std::path::absolute(dir)
                .ok()
                .map(|d| config::normalize(&d))
                .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()));
            match name {
                Some(n) => PathBuf::from(format!("{n}.keter")),
                None => return fail("cannot name the bundle after the folder: use -o NAME.keter"),
            }
        }
    };
    let file_name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    match AppName::from_bundle_file_name(&file_name) {
        Some(Ok(_)) => {}
        Some(Err(why)) => return fail(&format!("{}: {why}", out.display())),
        None => {
            return fail(&format!(
                "{}: a bundle file must be named NAME.keter (keter deploys only those)",
                out.display()
            ));
        }
    }
    match bundle::pack::pack(dir, &out) {
        Ok(p) => {
            let sha = sha256_of(&out).unwrap_or_else(|e| format!("unknown ({e})"));
            println!(
                "{}: {} entries, {} bytes of files, packed into {} bytes; sha256 {sha}",
                out.display(),
                p.entries,
                p.bytes,
                p.size
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(&format!("{}: {e}", dir.display())),
    }
}

/// `keter status [-c CONFIG] [--json]`.
/// `keter restart` and the other commands that ask the running daemon over its control
/// socket (`src/control/`): prints the daemon's answer, exits 0 when it did what was asked.
pub fn ask(config_path: &Path, request: &crate::control::Request, json: bool) -> ExitCode {
    let config = match client_config(config_path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match crate::control::client::ask(&config.root, request) {
        Ok(answer) if answer.ok => {
            match (&answer.data, json) {
                (Some(data), true) => match client::json_text(data) {
                    Ok(text) => println!("{text}"),
                    Err(e) => return fail(&e.to_string()),
                },
                (Some(data), false) => print!("{}", crate::control::client::releases_table(data)),
                (None, _) => println!("{}", crate::applog::printable(&answer.message)),
            }
            ExitCode::SUCCESS
        }
        Ok(answer) => fail(&crate::applog::printable(&answer.message)),
        Err(e) => fail(&e.to_string()),
    }
}

pub fn status(config_path: &Path, json: bool) -> ExitCode {
    let config = match client_config(config_path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let Some(address) = config.status else {
        return fail(&format!(
            "the status interface is disabled in {} (status: false)",
            config_path.display()
        ));
    };
    // What the daemon answered reaches the terminal only as printable text, errors included.
    let fail = |message: &str| fail(&crate::applog::printable(message));
    let body = match client::get(&address, "/api/apps", Duration::from_secs(10)) {
        Ok(b) => b,
        Err(e) => return fail(&e.to_string()),
    };
    let value: serde_json::Value = match serde_json::from_str(&body) {
        Ok(v) => v,
        Err(e) => {
            return fail(&format!(
                "{address} answered something that is not JSON: {e}"
            ));
        }
    };
    if json {
        match client::json_text(&value) {
            Ok(text) => println!("{text}"),
            Err(e) => return fail(&e.to_string()),
        }
        return ExitCode::SUCCESS;
    }
    match client::table(&value) {
        Ok(t) => {
            print!("{t}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(&format!("{address}: {e}")),
    }
}

/// A bundle file checked before `keter deploy` copies it anywhere: `keter check`'s reading
/// (unpacked with keter's limits, its config validated), with what only the deployment host
/// has (absolute executables, certificate files, static roots outside the bundle) left to the
/// hosts, as `keter bundle` leaves it. Returns the app's name, the file's sha256 and the
/// warnings, or every error.
pub(super) fn check_for_hosts(path: &Path) -> Result<(AppName, String, Vec<String>), Vec<String>> {
    if is_bundle_dir(path) {
        return Err(vec![format!(
            "{} is a bundle folder: pack it with `keter bundle` first and deploy the NAME.keter file",
            path.display()
        )]);
    }
    let opened = Opened::bundle(path, &bundle::Context::default(), &BundleLimits::default())?;
    let (errors, warnings) = opened.check_result();
    match (opened.app, opened.sha256, errors.is_empty()) {
        (Some(app), Some(sha256), true) => Ok((app, sha256, warnings)),
        _ => Err(errors),
    }
}

fn is_bundle_dir(path: &Path) -> bool {
    path.is_dir() && path.join("config").is_dir()
}

/// A bundle file or folder, read: its app name, checksum and config (or its problems).
struct Opened {
    /// `None` when the file or folder name is not a valid app name (then `errors` says so).
    app: Option<AppName>,
    sha256: Option<String>,
    config: Option<BundleConfig>,
    errors: Vec<String>,
    warnings: Vec<String>,
    /// Holds the unpacked files until the command is done.
    _scratch: Option<Scratch>,
}

impl Opened {
    /// Opens `path`: a `NAME.keter` file is unpacked (with the daemon's checks and `limits`)
    /// into a private temporary folder; a folder is read where it is. Both are checked as a
    /// deploy checks them, against `ctx`.
    fn bundle(
        path: &Path,
        ctx: &bundle::Context,
        limits: &BundleLimits,
    ) -> Result<Opened, Vec<String>> {
        let label = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.display().to_string());
        let mut errors = Vec::new();
        let name = if is_bundle_dir(path) {
            AppName::new(&label)
        } else {
            AppName::from_bundle_file_name(&label)
                .unwrap_or(Err(crate::names::NameError::NotABundleName))
        };
        let app = name
            .map_err(|why| errors.push(format!("{label}: {why}")))
            .ok();
        let (dir, sha256, scratch) = if is_bundle_dir(path) {
            (path.to_path_buf(), None, None)
        } else {
            let scratch = Scratch::new("bundle").map_err(|e| vec![e.to_string()])?;
            let dest = scratch.0.join("bundle");
            match bundle::unpack(path, &dest, limits) {
                Ok(u) => (u.dir, Some(u.sha256), Some(scratch)),
                Err(e) => {
                    errors.push(format!("{label}: {e}"));
                    return Err(errors);
                }
            }
        };
        let (config, problems) = bundle::check_config(&dir, &label, ctx);
        errors.extend(strings(&problems.errors));
        let warnings = strings(&problems.warnings);
        Ok(Opened {
            app,
            sha256,
            config,
            errors,
            warnings,
            _scratch: scratch,
        })
    }

    fn check_result(&self) -> (Vec<String>, Vec<String>) {
        (self.errors.clone(), self.warnings.clone())
    }
}

/// The configuration `render` renders with, and a note saying which one it is.
fn load_config(path: Option<&Path>, scratch: &Path) -> Result<(Config, String), Vec<String>> {
    let default = Path::new(config::DEFAULT_CONFIG_PATH);
    let (path, note) = match path {
        Some(p) => (p.to_path_buf(), p.display().to_string()),
        None if default.exists() => (default.to_path_buf(), default.display().to_string()),
        // The folder form gives every default; the root only names files never written.
        None => (
            scratch.to_path_buf(),
            format!(
                "keter's defaults ({} does not exist)",
                config::DEFAULT_CONFIG_PATH
            ),
        ),
    };
    let (config, problems) = Config::check(&path);
    match config {
        Some(c) if !problems.has_errors() => Ok((c, note)),
        _ => Err(strings(&problems.errors)),
    }
}

/// A private temporary folder, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(what: &str) -> Result<Scratch, ScratchError> {
        use std::os::unix::fs::DirBuilderExt;
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!("keter-{what}-{}-{nanos}", std::process::id()));
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|source| ScratchError {
                dir: dir.clone(),
                source,
            })?;
        Ok(Scratch(dir))
    }
}

/// The temporary folder `dir` cannot be made.
#[derive(Debug)]
struct ScratchError {
    dir: PathBuf,
    source: io::Error,
}

impl std::fmt::Display for ScratchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cannot create {}: {}", self.dir.display(), self.source)
    }
}

impl std::error::Error for ScratchError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The configuration as a client of the running daemon reads it (`keter status` and the
/// control socket's commands): what it needs is where the root and the status interface are.
/// An error in another key is the daemon's business, not the client's: a password file that
/// only root may read (`postgres.password-file`) must not keep a deployer from `keter
/// rollback`, nor an operator in `adm` from `keter status`; the daemon has read it.
fn client_config(config_path: &Path) -> Result<Config, ExitCode> {
    let (config, problems) = Config::check(config_path);
    let own = |p: &&Problem| {
        let top = p.key.split(['.', '[']).next().unwrap_or_default();
        matches!(top, "" | "root" | "status")
    };
    let own: Vec<Problem> = problems.errors.iter().filter(own).cloned().collect();
    match config {
        Some(c) if own.is_empty() => Ok(c),
        _ => {
            let errors = if own.is_empty() {
                &problems.errors
            } else {
                &own
            };
            Err(fail_with(&strings(errors), "the configuration has errors"))
        }
    }
}

fn strings(problems: &[Problem]) -> Vec<String> {
    problems.iter().map(|p| p.to_string()).collect()
}

fn print_problems(errors: &[String], warnings: &[String]) {
    for w in warnings {
        println!("warning: {w}");
    }
    for e in errors {
        println!("error: {e}");
    }
}

fn fail(message: &(impl std::fmt::Display + ?Sized)) -> ExitCode {
    eprintln!("keter: {message}");
    ExitCode::from(1)
}

fn fail_with(errors: &[String], summary: &str) -> ExitCode {
    for e in errors {
        eprintln!("error: {e}");
    }
    fail(summary)
}

fn sha256_of(path: &Path) -> std::io::Result<String> {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    let mut file = fs::File::open(path)?;
    std::io::copy(&mut file, &mut hasher)?;
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}
