//! Names the build: `KETER_BUILD` for the compiler, read by `src/build.rs`. It is the git
//! commit of the source tree (`git 1a2b3c4d5e`, with `, modified` when tracked files differ
//! from it), `KETER_BUILD` from the environment when the builder sets one (a source tarball
//! has no git history), else `no git`. Nothing depends on the time of the build, so the same
//! source builds the same binary.

use std::path::Path;
use std::process::Command;

fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn main() {
    println!("cargo:rerun-if-env-changed=KETER_BUILD");
    for path in ["build.rs", "Cargo.toml", "Cargo.lock", "src", "templates"] {
        println!("cargo:rerun-if-changed={path}");
    }
    let build = std::env::var("KETER_BUILD")
        .ok()
        .filter(|b| !b.trim().is_empty())
        .or_else(from_git)
        .unwrap_or_else(|| "no git".to_string());
    println!("cargo:rustc-env=KETER_BUILD={build}");
}

/// The commit of the source tree, when it is a git checkout of its own (not a tarball unpacked
/// inside another repository).
fn from_git() -> Option<String> {
    let dir = std::path::PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR")?);
    if !dir.join(".git").exists() {
        return None;
    }
    let hash = git(&dir, &["rev-parse", "--short=10", "HEAD"])?;
    // A commit, a checkout or a change staged moves these: this tree's HEAD and index, and the
    // branch HEAD names (not every ref: other worktrees of one repository share them).
    let git_dir = git(&dir, &["rev-parse", "--git-dir"]).map(|d| dir.join(d));
    let common = git(&dir, &["rev-parse", "--git-common-dir"]).map(|d| dir.join(d));
    let branch = git(&dir, &["symbolic-ref", "-q", "HEAD"]);
    let mut watched = Vec::new();
    if let Some(g) = &git_dir {
        watched.extend([g.join("HEAD"), g.join("index")]);
    }
    if let Some(c) = &common {
        watched.push(c.join("packed-refs"));
        if let Some(b) = &branch {
            watched.push(c.join(b));
        }
    }
    for path in watched.iter().filter(|p| p.exists()) {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    // Without optional locks: a status that refreshed the index would change a file watched above.
    let modified = git(
        &dir,
        &[
            "--no-optional-locks",
            "status",
            "--porcelain",
            "--untracked-files=no",
        ],
    )
    .is_some_and(|s| !s.is_empty());
    Some(if modified {
        format!("git {hash}, modified")
    } else {
        format!("git {hash}")
    })
}
