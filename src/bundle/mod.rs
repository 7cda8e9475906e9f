//! Bundles: the `NAME.keter` files an operator copies into `incoming/`.
//!
//! [`unpack`] turns the file into a fresh folder (safely: README, "How a deploy works", step
//! 2); [`config`] reads its
//! `config/keter.yaml`; [`load`] does both and resolves each stanza's executable.

pub mod config;
pub mod pack;
pub mod served;
pub mod unpack;

use std::path::{Path, PathBuf};

pub use config::{Background, BundleConfig, Program, WebApp};
pub use served::{Redirect, RedirectAction, RedirectTo, ReverseProxy, StaticFiles, Tls};
pub use unpack::{Progress, UnpackError, Unpacked, log_progress, unpack, unpack_with_progress};

use crate::problem::{Invalid, Problems};
use crate::yaml;

/// Reads `config/keter.yaml` (or `.yml`) from an unpacked bundle folder. `label` names the
/// bundle in messages (`hello.keter`). Returns the config and the warnings.
pub fn read_config(dir: &Path, label: &str) -> Result<(BundleConfig, Problems), Invalid> {
    match check_config(dir, label) {
        (Some(c), problems) if !problems.has_errors() => Ok((c, problems)),
        (_, problems) => Err(Invalid(problems.errors)),
    }
}

/// [`read_config`] for `keter check`: every problem, warnings included even when there are
/// errors; the config only when it could be read.
pub fn check_config(dir: &Path, label: &str) -> (Option<BundleConfig>, Problems) {
    let yaml_path = ["config/keter.yaml", "config/keter.yml"]
        .iter()
        .map(|p| dir.join(p))
        .find(|p| p.symlink_metadata().is_ok_and(|m| m.is_file()));
    let Some(yaml_path) = yaml_path else {
        let mut problems = Problems::new(label);
        problems.error(
            "",
            "the bundle has no config/keter.yaml (or config/keter.yml)",
        );
        return (None, problems);
    };
    let rel = yaml_path.strip_prefix(dir).unwrap_or(&yaml_path);
    let mut problems = Problems::new(format!("{label}: {}", rel.display()));
    let config = yaml::read_file(&yaml_path, &mut problems)
        .and_then(|tree| config::from_tree(&tree, &mut problems));
    if let Some(c) = &config {
        let programs = c
            .webapps
            .iter()
            .map(|w| &w.program)
            .chain(c.background.iter().map(|b| &b.program));
        for program in programs {
            if let Err(e) = resolve_exec(dir, &program.exec) {
                problems.error(program.key("exec"), e);
            }
        }
    }
    (config, problems)
}

/// Resolves a stanza's `exec` (relative to `config/`, or absolute meaning inside the bundle)
/// to a file inside the unpacked folder that is a regular executable file. Symlinks are
/// followed only when they stay inside the folder.
pub fn resolve_exec(dir: &Path, exec: &Path) -> Result<PathBuf, String> {
    let joined = if exec.is_absolute() {
        dir.join(exec.strip_prefix("/").unwrap_or(exec))
    } else {
        dir.join("config").join(exec)
    };
    let lexical = crate::config::normalize(&joined);
    let root = dir
        .canonicalize()
        .map_err(|e| format!("cannot resolve the bundle folder: {e}"))?;
    if !lexical.starts_with(dir) {
        return Err(format!("{} points outside the bundle", exec.display()));
    }
    let real = match lexical.canonicalize() {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(format!("{} is not in the bundle", exec.display()));
        }
        Err(e) => return Err(format!("{}: {e}", exec.display())),
    };
    if !real.starts_with(&root) {
        return Err(format!(
            "{} resolves outside the bundle (through a symlink)",
            exec.display()
        ));
    }
    let meta = real
        .metadata()
        .map_err(|e| format!("{}: {e}", exec.display()))?;
    use std::os::unix::fs::PermissionsExt;
    if !meta.is_file() {
        return Err(format!("{} is not a regular file", exec.display()));
    }
    if meta.permissions().mode() & 0o111 == 0 {
        return Err(format!("{} is not executable", exec.display()));
    }
    Ok(real)
}

/// Resolves a path of a `static-files` stanza (relative to `config/`) to a folder inside the
/// unpacked bundle. Keter let a bundle serve `../../` or `/home`; keter refuses a root that
/// resolves outside the bundle.
pub fn resolve_dir(dir: &Path, rel: &Path) -> Result<PathBuf, String> {
    let real = resolve_inside(dir, rel)?;
    if !real.is_dir() {
        return Err(format!("{} is not a folder", rel.display()));
    }
    Ok(real)
}

/// Resolves a file of the bundle (relative to `config/`) inside the unpacked folder.
pub fn resolve_file(dir: &Path, rel: &Path) -> Result<PathBuf, String> {
    let real = resolve_inside(dir, rel)?;
    if !real.is_file() {
        return Err(format!("{} is not a regular file", rel.display()));
    }
    Ok(real)
}

fn resolve_inside(dir: &Path, rel: &Path) -> Result<PathBuf, String> {
    let joined = if rel.is_absolute() {
        return Err(format!(
            "{} is an absolute path; paths are relative to config/ and stay inside the bundle",
            rel.display()
        ));
    } else {
        dir.join("config").join(rel)
    };
    let root = dir
        .canonicalize()
        .map_err(|e| format!("cannot resolve the bundle folder: {e}"))?;
    let real = joined.canonicalize().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => format!("{} is not in the bundle", rel.display()),
        _ => format!("{}: {e}", rel.display()),
    })?;
    if !real.starts_with(&root) {
        return Err(format!("{} resolves outside the bundle", rel.display()));
    }
    Ok(real)
}
