//! The in-place upgrade (README, "Upgrading keter in place"): on SIGUSR2 keter re-executes its
//! binary, from the path it was started from (after a package upgrade `/proc/self/exe` names
//! the deleted old file), in the same process, and the new image takes over every app without
//! restarting one. The apps stay keter's children, their pipes and the managed Nginx master
//! stay where they are, and the state is in the records (`src/app/record.rs`) plus a small
//! handover file passed on as a memfd: the output pipes, each with the line it was reading.
//!
//! Before anything is stopped, the new binary is asked (`keter --check-handover ARGS`) whether
//! it reads this configuration, this root and these formats: it answers with the formats it
//! reads (`src/formats/handover.rs`, `Answer`), which must include the ones this keter writes,
//! so a newer binary takes over from any older keter. If it is missing, broken or cannot read
//! them, this keter logs why and carries on. If the new image fails after the exec, the state is
//! still in the records: a keter started again (by systemd's `Restart=`, or by hand) takes the
//! apps over from there, as after a crash.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nix::fcntl::{FcntlArg, FdFlag, fcntl};
use nix::sys::memfd::{MFdFlags, memfd_create};

use crate::app::Inherited;
use crate::childwatch::HeldPipe;
use crate::config::{Config, NginxMode};
pub use crate::formats::handover::Answer;
use crate::formats::handover::{FORMAT, Handed, HandedPipe};
use crate::formats::{Mono, ReadError, records};

/// The environment variable that names the handover file's descriptor in the new image.
const FD_VAR: &str = "KETER_HANDOVER_FD";
/// The hidden command that asks a binary whether it can take over.
pub const CHECK: &str = "--check-handover";
/// How long the new binary may take to answer [`CHECK`].
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// What an earlier image of this process handed over.
#[derive(Default)]
pub struct Takeover {
    /// The apps' output pipes, by inode, with the unfinished line read from each.
    pub pipes: Inherited,
    /// When the upgrade began (the signal), in the earlier image.
    pub since: Option<Instant>,
    /// The version of keter that handed over.
    pub from: String,
}

/// Why the binary at the start path does not take over.
#[derive(Debug)]
pub enum ProbeError {
    /// `main` did not remember the command line.
    NoCommandLine,
    Spawn(PathBuf, io::Error),
    Wait(PathBuf, io::Error),
    Timeout(PathBuf),
    /// It ended with `status`, saying `said` last on its standard error.
    Failed(PathBuf, ExitStatus, String),
    /// What it printed is not an [`Answer`].
    NotAnAnswer(PathBuf, serde_json::Error),
    /// It cannot read the formats this keter writes.
    Formats(Answer),
    /// The configuration on disk now has another root.
    Root {
        now: PathBuf,
        running: PathBuf,
    },
    /// The configuration on disk now has another Nginx mode.
    NginxMode {
        now: String,
        running: String,
    },
}

impl fmt::Display for ProbeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProbeError::NoCommandLine => write!(f, "the command line is not known"),
            ProbeError::Spawn(p, e) => write!(f, "cannot run {}: {e}", p.display()),
            ProbeError::Wait(p, e) => write!(f, "waiting for {}: {e}", p.display()),
            ProbeError::Timeout(p) => write!(
                f,
                "{} {CHECK} did not answer within {CHECK_TIMEOUT:?}",
                p.display()
            ),
            ProbeError::Failed(p, status, said) => {
                write!(f, "{} {CHECK} failed ({status})", p.display())?;
                if !said.is_empty() {
                    write!(f, ": {said}")?;
                }
                Ok(())
            }
            ProbeError::NotAnAnswer(p, e) => write!(
                f,
                "{} does not answer {CHECK} as a keter that can take over does ({e})",
                p.display()
            ),
            ProbeError::Formats(a) => write!(
                f,
                "keter {} reads handover format {} and records of format {}; this keter writes handover format {FORMAT} and records of format {}",
                a.keter,
                a.reads_handover(),
                a.reads_records(),
                records::FORMAT
            ),
            ProbeError::Root { now, running } => write!(
                f,
                "the configuration now has the root {}, not {}; restart keter to move it",
                now.display(),
                running.display()
            ),
            ProbeError::NginxMode { now, running } => write!(
                f,
                "the configuration now has nginx.mode {now}, not {running}; restart keter to change it"
            ),
        }
    }
}

impl std::error::Error for ProbeError {}

/// Why the handover file of an earlier image does not read.
#[derive(Debug)]
pub enum TakeError {
    Read(io::Error),
    Format(ReadError),
}

impl fmt::Display for TakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TakeError::Read(e) => write!(f, "cannot read the handover file: {e}"),
            TakeError::Format(e) => write!(f, "the handover file does not read: {e}"),
        }
    }
}

impl std::error::Error for TakeError {}

/// How keter was started: what an upgrade executes again.
struct Invocation {
    /// The program as it was started, made absolute, symlinks kept (a package upgrade or an
    /// operator replaces the file at this path).
    program: PathBuf,
    arg0: OsString,
    args: Vec<OsString>,
}

static INVOCATION: OnceLock<Invocation> = OnceLock::new();

/// Remembers the command line; called first thing in `main`, before any `chdir`.
pub fn remember_invocation() {
    INVOCATION.get_or_init(|| {
        let mut all = std::env::args_os();
        let arg0 = all.next().unwrap_or_else(|| "keter".into());
        Invocation {
            program: program_path(&arg0),
            arg0,
            args: all.collect(),
        }
    });
}

/// The path of the program named by `arg0`: relative to the current folder when it has a
/// slash, else found on `PATH`; the running executable when neither works.
fn program_path(arg0: &OsStr) -> PathBuf {
    let p = Path::new(arg0);
    if arg0.as_bytes().contains(&b'/') {
        let absolute = std::env::current_dir()
            .map(|d| d.join(p))
            .unwrap_or(p.into());
        return crate::fspath::normalize(&absolute);
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join(p);
            if candidate.is_file() {
                return if candidate.is_absolute() {
                    candidate
                } else {
                    std::env::current_dir()
                        .map(|d| d.join(&candidate))
                        .unwrap_or(candidate)
                };
            }
        }
    }
    std::fs::read_link("/proc/self/exe").unwrap_or(p.into())
}

/// The program an upgrade executes.
pub fn program() -> PathBuf {
    remember_invocation();
    INVOCATION
        .get()
        .map(|i| i.program.clone())
        .unwrap_or_default()
}

/// The answer to [`CHECK`] for `config`.
pub fn answer(config: &Config) -> Answer {
    crate::formats::handover::answer(config.root.clone(), mode_name(config.nginx.mode))
}

fn mode_name(mode: NginxMode) -> &'static str {
    match mode {
        NginxMode::Managed => "managed",
        NginxMode::System => "system",
    }
}

/// Asks the binary at the start path whether it takes over from this keter running `config`:
/// it must answer [`CHECK`] in time, read the formats this keter writes and, with the
/// configuration as it is now on disk, keep the same root and Nginx mode. The reason when it
/// does not.
pub fn probe(config: &Config) -> Result<Answer, ProbeError> {
    remember_invocation();
    let inv = INVOCATION.get().ok_or(ProbeError::NoCommandLine)?;
    let program = || inv.program.clone();
    let mut child = Command::new(&inv.program)
        .arg(CHECK)
        .args(&inv.args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| ProbeError::Spawn(program(), e))?;
    let deadline = Instant::now() + CHECK_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(ProbeError::Timeout(program()));
            }
            Err(e) => return Err(ProbeError::Wait(program(), e)),
        }
    };
    let mut out = String::new();
    let mut err = String::new();
    if let Some(mut o) = child.stdout.take() {
        let _ = o.read_to_string(&mut out);
    }
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    if !status.success() {
        let said = err.trim().lines().last().unwrap_or("").to_string();
        return Err(ProbeError::Failed(program(), status, said));
    }
    let answer: Answer =
        serde_json::from_str(out.trim()).map_err(|e| ProbeError::NotAnAnswer(program(), e))?;
    decide(answer, &self::answer(config))
}

/// Whether the binary that gave `answer` takes over from this keter, whose own answer is
/// `ours`: it reads the formats this keter writes, and runs on the same root and Nginx mode.
fn decide(answer: Answer, ours: &Answer) -> Result<Answer, ProbeError> {
    if !answer.reads_handover().contains(FORMAT)
        || !answer.reads_records().contains(records::FORMAT)
    {
        return Err(ProbeError::Formats(answer));
    }
    if answer.root != ours.root {
        return Err(ProbeError::Root {
            now: answer.root,
            running: ours.root.clone(),
        });
    }
    if answer.nginx_mode != ours.nginx_mode {
        return Err(ProbeError::NginxMode {
            now: answer.nginx_mode,
            running: ours.nginx_mode.clone(),
        });
    }
    Ok(answer)
}

/// Re-executes keter with the handover file; returns only if the exec failed (then this image
/// carries on as it was). `pipes` are the output pipes the watch thread held; `lock` is the
/// root's lock, kept across the exec (`src/rootlock.rs`).
pub fn exec(pipes: &[HeldPipe], since: Instant, lock: RawFd) -> io::Error {
    let Some(inv) = INVOCATION.get() else {
        return io::Error::other("the command line is not known");
    };
    let handed = Handed {
        format: FORMAT,
        from: crate::build::VERSION.to_string(),
        since: Mono::of(since),
        pipes: pipes
            .iter()
            .map(|p| HandedPipe {
                ino: p.ino,
                fd: p.fd,
                partial: p.partial.clone(),
            })
            .collect(),
    };
    let file = match handover_file(&handed) {
        Ok(f) => f,
        Err(e) => return e,
    };
    for p in pipes {
        set_cloexec(held_pipe(p), false);
    }
    let mut cmd = Command::new(&inv.program);
    cmd.arg0(&inv.arg0).args(&inv.args).env_clear();
    for (k, v) in std::env::vars_os() {
        // The descriptors systemd passed at the start are no longer there.
        let stale = [
            FD_VAR,
            crate::rootlock::FD_VAR,
            "LISTEN_FDS",
            "LISTEN_PID",
            "LISTEN_FDNAMES",
        ];
        if !stale.iter().any(|s| k == *s) {
            cmd.env(k, v);
        }
    }
    cmd.env(FD_VAR, file.as_raw_fd().to_string());
    // The new image raises the limit of open files again and needs to know the one keter was
    // started with, for the processes it starts.
    if let Some(soft) = crate::process::started_open_files() {
        cmd.env(crate::process::OPEN_FILES_VAR, soft.to_string());
    }
    cmd.env(crate::rootlock::FD_VAR, lock.to_string());
    // The signals keter handles stay blocked across the exec, so that one sent meanwhile
    // waits for the new image's handlers instead of ending it ([`unblock_signals`]); every
    // other signal is unblocked. (`exec` runs this in this process: on failure the mask is
    // put back.)
    let mut before = nix::sys::signal::SigSet::empty();
    let _ = nix::sys::signal::pthread_sigmask(
        nix::sys::signal::SigmaskHow::SIG_BLOCK,
        None,
        Some(&mut before),
    );
    let held = held_signals();
    // SAFETY: sigprocmask and fcntl are async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            // Here, in this process right before the exec, so that no process another thread
            // starts meanwhile inherits the lock (it would keep the root locked after keter).
            crate::rootlock::set_cloexec(lock, false);
            nix::sys::signal::sigprocmask(
                nix::sys::signal::SigmaskHow::SIG_SETMASK,
                Some(&held),
                None,
            )
            .map_err(io::Error::from)
        });
    }
    let e = cmd.exec();
    let _ = nix::sys::signal::pthread_sigmask(
        nix::sys::signal::SigmaskHow::SIG_SETMASK,
        Some(&before),
        None,
    );
    for p in pipes {
        set_cloexec(held_pipe(p), true);
    }
    crate::rootlock::set_cloexec(lock, true);
    drop(file);
    e
}

/// The signals keter handles (SIGTERM, SIGINT, SIGHUP, SIGUSR2).
fn held_signals() -> nix::sys::signal::SigSet {
    use nix::sys::signal::Signal;
    let mut set = nix::sys::signal::SigSet::empty();
    for s in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGUSR2,
    ] {
        set.add(s);
    }
    set
}

/// Unblocks the signals an upgrade kept blocked across the exec, once their handlers are in
/// place: one that came meanwhile is delivered now.
pub fn unblock_signals() {
    let _ = nix::sys::signal::pthread_sigmask(
        nix::sys::signal::SigmaskHow::SIG_UNBLOCK,
        Some(&held_signals()),
        None,
    );
}

/// The handover file: a memfd (no file on disk to leave behind), inherited by the new image.
fn handover_file(handed: &Handed) -> io::Result<File> {
    let mut file = File::from(memfd_create(c"keter-handover", MFdFlags::empty())?);
    file.write_all(&serde_json::to_vec(handed).map_err(io::Error::other)?)?;
    file.rewind()?;
    Ok(file)
}

/// A pipe the watch thread holds.
fn held_pipe(p: &HeldPipe) -> BorrowedFd<'_> {
    // SAFETY: the watch thread keeps the pipe open while it is paused, which it is for as long
    // as an upgrade holds the `HeldPipe`s.
    unsafe { BorrowedFd::borrow_raw(p.fd) }
}

fn set_cloexec(fd: BorrowedFd<'_>, on: bool) {
    let flags = if on {
        FdFlag::FD_CLOEXEC
    } else {
        FdFlag::empty()
    };
    if let Err(e) = fcntl(fd, FcntlArg::F_SETFD(flags)) {
        log::warn!(
            "keter: descriptor {}: cannot set close-on-exec: {e}",
            fd.as_raw_fd()
        );
    }
}

/// The inode of the pipe open as descriptor `fd` of this process, if it is one.
fn pipe_inode(fd: RawFd) -> Option<u64> {
    let target = std::fs::read_link(format!("/proc/self/fd/{fd}")).ok()?;
    target
        .to_str()?
        .strip_prefix("pipe:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// In the new image: reads what the earlier one handed over, if this image was started by an
/// upgrade. Must run before other threads start (it removes a variable from the environment).
pub fn take() -> Option<Result<Takeover, TakeError>> {
    let fd: RawFd = std::env::var(FD_VAR).ok()?.parse().ok()?;
    // SAFETY: called at the start of `main`, before any other thread exists.
    unsafe { std::env::remove_var(FD_VAR) };
    // SAFETY: the earlier image passed this descriptor for us alone; nothing else owns it.
    let mut file = unsafe { File::from_raw_fd(fd) };
    let mut bytes = Vec::new();
    if let Err(e) = file.read_to_end(&mut bytes) {
        return Some(Err(TakeError::Read(e)));
    }
    drop(file);
    let handed = match crate::formats::handover::read(&bytes) {
        Ok(h) => h,
        Err(e) => return Some(Err(TakeError::Format(e))),
    };
    let mut pipes = HashMap::new();
    for p in handed.pipes {
        // Only a descriptor that is the pipe named is taken: a number alone proves nothing.
        if pipe_inode(p.fd) != Some(p.ino) {
            continue;
        }
        // SAFETY: the descriptor is open, is the pipe named, and was handed over for us alone.
        let file = unsafe { File::from_raw_fd(p.fd) };
        if file
            .metadata()
            .is_ok_and(|m| m.file_type().is_fifo() && m.ino() == p.ino)
        {
            set_cloexec(file.as_fd(), true);
            pipes.insert(p.ino, (file, p.partial));
        }
    }
    Some(Ok(Takeover {
        pipes,
        since: Some(handed.since.instant()),
        from: handed.from,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::Reads;
    use crate::formats::handover::{self as format, RANGELESS};

    fn ours() -> Answer {
        format::answer("/var/lib/keter".into(), "managed")
    }

    fn rangeless(handover: u32, records: u32) -> Answer {
        Answer {
            keter: "0.1.0".into(),
            handover,
            records,
            reads_handover: None,
            reads_records: None,
            ..ours()
        }
    }

    #[test]
    fn a_binary_that_reads_these_formats_takes_over_whatever_it_writes() {
        assert!(decide(ours(), &ours()).is_ok());
        // A newer one that reads from format 1 on.
        let newer = Answer {
            handover: FORMAT + 1,
            records: records::FORMAT + 1,
            reads_handover: Some(Reads {
                oldest: 1,
                newest: FORMAT + 1,
            }),
            reads_records: Some(Reads {
                oldest: 1,
                newest: records::FORMAT + 1,
            }),
            ..ours()
        };
        assert!(decide(newer, &ours()).is_ok());
        // One before the ranges reads its own formats: these, as long as they are format 1.
        assert_eq!(
            decide(rangeless(RANGELESS, RANGELESS), &ours()).is_ok(),
            FORMAT == RANGELESS && records::FORMAT == RANGELESS
        );
    }

    #[test]
    fn a_binary_that_cannot_read_these_formats_is_refused_saying_which_it_reads() {
        let older = Answer {
            reads_records: Some(Reads {
                oldest: records::FORMAT + 1,
                newest: records::FORMAT + 2,
            }),
            ..ours()
        };
        let e = decide(older, &ours()).unwrap_err().to_string();
        assert!(
            e.contains(&format!(
                "records of format {} to {}",
                records::FORMAT + 1,
                records::FORMAT + 2
            )) && e.contains(&format!("this keter writes handover format {FORMAT}")),
            "{e}"
        );
        let e = decide(rangeless(99, 1), &ours()).unwrap_err().to_string();
        assert!(e.contains("reads handover format 99"), "{e}");
    }

    #[test]
    fn another_root_or_nginx_mode_is_refused() {
        let moved = Answer {
            root: "/srv/keter".into(),
            ..ours()
        };
        let e = decide(moved, &ours()).unwrap_err().to_string();
        assert!(e.contains("restart keter to move it"), "{e}");
        let system = Answer {
            nginx_mode: "system".into(),
            ..ours()
        };
        let e = decide(system, &ours()).unwrap_err().to_string();
        assert!(e.contains("restart keter to change it"), "{e}");
    }
}
