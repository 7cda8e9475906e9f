//! All process handling in one place: spawning an app in its own process group with a clean
//! signal mask, a chosen environment and its output in the app's log (read, like its exit, by
//! the one [`crate::childwatch`] thread); and stopping the whole group (SIGTERM, then SIGKILL
//! after a grace period).

use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{self, SigSet, SigmaskHow, Signal};
use nix::unistd::Pid;

use crate::applog::AppLog;
use crate::formats::records::{RunAsRecord, SpecRecord};
use crate::procfs;

/// What to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub cwd: PathBuf,
    /// The complete environment (nothing is inherited from keter).
    pub env: Vec<(String, String)>,
    /// The user to run as (`setuid`); `None` runs as keter's own user.
    pub user: Option<RunAs>,
    /// What the kernel holds the process to (`src/cgroup.rs`). Not recorded: the kernel keeps
    /// them with the process's group, which a process taken over is started again in.
    pub limits: crate::cgroup::Limits,
}

/// A user to run apps as, resolved once from the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups of the user.
    pub groups: Vec<u32>,
    pub home: PathBuf,
}

impl RunAs {
    /// Looks up a user by name or numeric uid, with its supplementary groups.
    pub fn lookup(user: &str) -> Result<RunAs, UserError> {
        use nix::unistd::{Uid, User, getgrouplist};
        let found = match user.parse::<u32>() {
            Ok(uid) => User::from_uid(Uid::from_raw(uid)),
            Err(_) => User::from_name(user),
        }
        .map_err(|source| UserError::Lookup {
            user: user.to_string(),
            source,
        })?
        .ok_or_else(|| UserError::NoSuchUser(user.to_string()))?;
        let name = std::ffi::CString::new(found.name.clone())
            .map_err(|_| UserError::NulInName(found.name.clone()))?;
        let groups = getgrouplist(&name, found.gid)
            .map_err(|source| UserError::Groups {
                user: user.to_string(),
                source,
            })?
            .into_iter()
            .map(|g| g.as_raw())
            .collect();
        Ok(RunAs {
            name: found.name,
            uid: found.uid.as_raw(),
            gid: found.gid.as_raw(),
            groups,
            home: found.dir,
        })
    }
}

/// The record of a [`Spec`] (`src/formats/records.rs`).
impl From<&Spec> for SpecRecord {
    fn from(s: &Spec) -> SpecRecord {
        SpecRecord {
            program: s.program.clone(),
            args: s.args.clone(),
            cwd: s.cwd.clone(),
            env: s.env.clone(),
            user: s.user.as_ref().map(|u| RunAsRecord {
                name: u.name.clone(),
                uid: u.uid,
                gid: u.gid,
                groups: u.groups.clone(),
                home: u.home.clone(),
            }),
        }
    }
}

impl From<SpecRecord> for Spec {
    fn from(s: SpecRecord) -> Spec {
        Spec {
            program: s.program,
            args: s.args,
            cwd: s.cwd,
            env: s.env,
            user: s.user.map(|u| RunAs {
                name: u.name,
                uid: u.uid,
                gid: u.gid,
                groups: u.groups,
                home: u.home,
            }),
            limits: crate::cgroup::Limits::default(),
        }
    }
}

/// Why a user cannot be looked up in the system's user database; `user` as it was asked for.
#[derive(Debug)]
pub enum UserError {
    Lookup {
        user: String,
        source: nix::errno::Errno,
    },
    NoSuchUser(String),
    /// A user name with a NUL byte.
    NulInName(String),
    /// Its supplementary groups cannot be listed.
    Groups {
        user: String,
        source: nix::errno::Errno,
    },
}

impl std::fmt::Display for UserError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UserError::Lookup { user, source } => {
                write!(f, "cannot look up the user {user:?}: {source}")
            }
            UserError::NoSuchUser(user) => write!(f, "no user {user:?} on this system"),
            UserError::NulInName(user) => write!(f, "the user name {user:?} contains a NUL byte"),
            UserError::Groups { user, source } => {
                write!(f, "cannot list the groups of {user:?}: {source}")
            }
        }
    }
}

impl std::error::Error for UserError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            UserError::Lookup { source, .. } | UserError::Groups { source, .. } => Some(source),
            UserError::NoSuchUser(_) | UserError::NulInName(_) => None,
        }
    }
}

/// A started process, leader of its own process group. It is known by its pid and its start
/// time, so a process that an earlier keter started (before an in-place upgrade, or before it
/// was killed) is `Running` as well.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Running {
    /// Pid of the process, also its process group id.
    pub pid: i32,
    pub started: Instant,
    /// When it started, in clock ticks since boot (`/proc/PID/stat` field 22): tells it from
    /// a later process that got the same pid.
    pub ticks: u64,
    /// Inode of its output pipe (0 for none), by which a later keter finds the pipe again.
    pub output: u64,
}

/// The soft limit of open files keter was started with, which every app gets back; 0 while
/// keter has not raised its own.
static STARTED_OPEN_FILES: AtomicU64 = AtomicU64::new(0);

/// The environment variable that carries [`STARTED_OPEN_FILES`] across an in-place upgrade
/// (`src/handover.rs`), whose new image finds the soft limit raised already.
pub const OPEN_FILES_VAR: &str = "KETER_STARTED_NOFILE";

/// Raises keter's soft limit of open files (RLIMIT_NOFILE) to its hard limit, as Go and
/// systemd recommend for a program that holds many descriptors: under systemd the soft limit
/// is 1024 (for the sake of `select()`), and every app's pipe, the status interface's
/// connections and the Nginx files count against it. Apps get the soft limit keter was
/// started with back, so that an app that uses `select()` keeps working.
/// Returns the limits before and after, when it changed anything. Must run before other
/// threads start (it removes [`OPEN_FILES_VAR`] from the environment).
pub fn raise_open_files() -> Option<(u64, u64)> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let handed = std::env::var(OPEN_FILES_VAR)
        .ok()
        .and_then(|v| v.parse::<u64>().ok());
    // SAFETY: called before keter starts any thread (see above).
    unsafe { std::env::remove_var(OPEN_FILES_VAR) };
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    let started = handed.unwrap_or(soft).min(hard);
    STARTED_OPEN_FILES.store(started, Ordering::Relaxed);
    if soft >= hard {
        return None;
    }
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).ok()?;
    Some((soft, hard))
}

/// The soft limit of open files keter was started with, if it raised its own.
pub fn started_open_files() -> Option<u64> {
    Some(STARTED_OPEN_FILES.load(Ordering::Relaxed)).filter(|n| *n > 0)
}

/// The limit of open files an app starts with: keter's soft limit at its start, under the
/// hard limit it has now.
fn started_open_files_limit() -> Option<libc::rlimit> {
    let soft = started_open_files()?;
    let (_, hard) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).ok()?;
    Some(libc::rlimit {
        rlim_cur: soft.min(hard),
        rlim_max: hard,
    })
}

/// A command that will run as the leader of a new process group (so that stopping it reaches
/// every process it starts, and a Ctrl-C meant for keter does not reach it directly), with an
/// empty signal mask, default signal dispositions and no descriptor beyond 0, 1 and 2.
pub fn command_in_new_group(program: &Path) -> Command {
    let mut cmd = Command::new(program);
    cmd.process_group(0);
    // SAFETY: the closure only calls async-signal-safe functions (sigprocmask, signal,
    // close_range).
    unsafe {
        cmd.pre_exec(|| {
            // keter's threads may block signals; a child must start with none blocked and with
            // default dispositions, or it would ignore the SIGTERM that stops it.
            signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)
                .map_err(io::Error::from)?;
            for sig in [
                Signal::SIGTERM,
                Signal::SIGINT,
                Signal::SIGHUP,
                Signal::SIGPIPE,
            ] {
                signal::signal(sig, signal::SigHandler::SigDfl).map_err(io::Error::from)?;
            }
            // Nothing beyond stdin, stdout and stderr reaches the program, whatever keter
            // itself inherited or opened without close-on-exec (as systemd does for services).
            // Best effort: close_range needs Linux 5.11 for this flag.
            libc::syscall(
                libc::SYS_close_range,
                3u32,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            );
            Ok(())
        });
    }
    cmd
}

/// Runs `work` on a thread of its own under SCHED_IDLE (it gets a CPU only when nothing else
/// wants one) and waits for it: for keter's own CPU-bound work, such as unpacking, which would
/// otherwise delay requests that Nginx and the apps are serving (with it, the p99 of requests
/// during redeploys went from a median 2.8 to 2.1 times the steady one). After `grace` the thread gets the normal policy back, so that a machine kept busy
/// (a runaway app spinning on every core) delays a deploy by at most that much. A thread's
/// policy is inherited by the processes it starts, hence a thread of its own.
pub fn when_idle<T: Send>(grace: Duration, work: impl FnOnce() -> T + Send) -> T {
    let mut work = Some(work);
    let out = std::thread::scope(|scope| {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let work = &mut work;
        let spawned = std::thread::Builder::new()
            .name("idle-work".into())
            .spawn_scoped(scope, move || {
                // Idle before the caller learns the thread id, so that the caller's switch
                // back to the normal policy can never come first and be undone.
                set_policy(0, libc::SCHED_IDLE);
                let _ = tx.send(nix::unistd::gettid().as_raw());
                (work.take().expect("run once"))()
            })
            .ok()?;
        if let Ok(tid) = rx.recv() {
            let deadline = Instant::now() + grace;
            while !spawned.is_finished() {
                let now = Instant::now();
                if now >= deadline {
                    set_policy(tid, libc::SCHED_OTHER);
                    break;
                }
                std::thread::sleep((deadline - now).min(Duration::from_millis(5)));
            }
        }
        Some(spawned.join())
    });
    match out {
        Some(Ok(v)) => v,
        Some(Err(panic)) => std::panic::resume_unwind(panic),
        // No thread to be had: the work runs here with the normal policy.
        None => (work.take().expect("run once"))(),
    }
}

/// Sets the scheduling policy of thread `tid` (0: the calling thread). Best effort: on a
/// failure the thread keeps the policy it has.
fn set_policy(tid: libc::pid_t, policy: libc::c_int) {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: a plain system call with a valid parameter block.
    unsafe {
        libc::sched_setscheduler(tid, policy, &param);
    }
}

/// Bytes an app's output pipe holds before the app blocks on its next write while nobody reads
/// it (a keter being upgraded or started again). Pipe pages are taken only as they fill.
const OUTPUT_PIPE_BYTES: libc::c_int = 1 << 20;

/// Starts `spec` in a new process group with stdout and stderr going to `log`, and in the
/// control groups of `join` (`src/cgroup.rs`). `on_exit` runs on the watch thread with the
/// pid and status once the process has exited and been reaped.
pub fn spawn(
    spec: &Spec,
    log: &AppLog,
    join: Option<&crate::cgroup::Join>,
    on_exit: impl FnOnce(i32, Option<ExitStatus>) + Send + 'static,
) -> io::Result<Running> {
    let (read_end, app_end) = output_pipe()?;
    let app_err = app_end.try_clone()?;
    let mut cmd = command_in_new_group(&spec.program);
    cmd.args(&spec.args)
        .current_dir(&spec.cwd)
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::from(app_end))
        .stderr(Stdio::from(app_err));
    // Into its control groups first, as root and before it can start anything: a process
    // cannot leave them, whatever it does with its process group.
    if let Some(fds) = join.map(|j| j.raw()).filter(|f| !f.is_empty()) {
        // SAFETY: write is an async-signal-safe system call on descriptors opened before the
        // fork; nothing is allocated in the child.
        unsafe {
            cmd.pre_exec(move || {
                for fd in &fds {
                    if libc::write(*fd, b"0".as_ptr().cast(), 1) != 1 {
                        return Err(io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
    }
    // An app gets the soft limit of open files keter was started with, not the one keter
    // raised for itself ([`raise_open_files`]): a program that uses `select()` breaks on
    // descriptors above 1023. (Nginx, started without this, keeps the raised one.)
    if let Some(limit) = started_open_files_limit() {
        // SAFETY: setrlimit is an async-signal-safe system call on a prepared struct.
        unsafe {
            cmd.pre_exec(move || {
                libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
                Ok(())
            });
        }
    }
    if let Some(user) = spec.user.clone() {
        // `CommandExt::uid/gid` would clear the supplementary groups; set all three here, in
        // the order that keeps the permission to change them (groups, group, then user).
        // SAFETY: setgroups, setgid and setuid are async-signal-safe system calls.
        // Everything is prepared before the fork: no allocation happens in the child.
        let groups: Vec<nix::unistd::Gid> = user
            .groups
            .iter()
            .map(|g| nix::unistd::Gid::from_raw(*g))
            .collect();
        unsafe {
            cmd.pre_exec(move || {
                nix::unistd::setgroups(&groups).map_err(io::Error::from)?;
                nix::unistd::setgid(nix::unistd::Gid::from_raw(user.gid))
                    .map_err(io::Error::from)?;
                nix::unistd::setuid(nix::unistd::Uid::from_raw(user.uid))
                    .map_err(io::Error::from)?;
                Ok(())
            });
        }
    }
    let child = spawn_retrying(&mut cmd)?;
    // The parent's copies of the app's end are closed with `cmd`, so the pipe reaches end of
    // file when the whole group has closed its output.
    drop(cmd);
    let pid = child.id() as i32;
    // Reaped by the watch thread, by pid.
    drop(child);
    let ticks = procfs::start_ticks(pid).unwrap_or(0);
    let output = read_end.metadata().map(|m| m.ino()).unwrap_or(0);
    let watched = crate::childwatch::pidfd_open(pid)
        .and_then(|pidfd| crate::childwatch::exit(pid, pidfd, Box::new(on_exit)));
    if let Err(e) = watched {
        stop_group(pid, Duration::ZERO);
        crate::childwatch::reap(pid);
        return Err(e);
    }
    if let Err(e) = crate::childwatch::output(read_end, log.clone()) {
        // Unread, its output would fill the pipe and block it; the exit is still reaped.
        stop_group(pid, Duration::ZERO);
        return Err(e);
    }
    Ok(Running {
        pid,
        started: Instant::now(),
        ticks,
        output,
    })
}

/// An app's output pipe: keter's reading end, and the app's end, which is the same pipe
/// opened for reading and writing. Holding it for reading too, the app never writes into a
/// pipe without a reader, so it gets no SIGPIPE when keter dies or re-executes itself: it
/// outlives keter, and the next keter opens the pipe again from `/proc/PID/fd`
/// ([`procfs::open_pipe_of_group`]) and reads what the app wrote meanwhile. The app never
/// reads it (nobody reads their stdout).
fn output_pipe() -> io::Result<(File, File)> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    // Close-on-exec: an app started at the same moment by another thread must not inherit
    // this app's pipe (its output would never reach end of file while the other one runs).
    let (read_end, write_end) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)?;
    let app_end = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(format!("/proc/self/fd/{}", write_end.as_raw_fd()))?;
    drop(write_end);
    // Best effort: room for what an app prints while no keter reads (the default is 64 KiB).
    let _ = nix::fcntl::fcntl(
        &read_end,
        nix::fcntl::FcntlArg::F_SETPIPE_SZ(OUTPUT_PIPE_BYTES),
    );
    Ok((File::from(read_end), app_end))
}

/// `Command::spawn`, retried on ETXTBSY: the executable was just written by the unpacker, and
/// another thread's fork in that moment can still hold a copy of the writing descriptor until
/// its own exec closes it (the well-known fork/exec race of multithreaded programs).
fn spawn_retrying(cmd: &mut Command) -> io::Result<std::process::Child> {
    let mut pause = Duration::from_millis(2);
    for _ in 0..10 {
        match cmd.spawn() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) => {
                std::thread::sleep(pause);
                pause *= 2;
            }
            other => return other,
        }
    }
    cmd.spawn()
}

/// Describes an exit status for the log: `exit code 3`, `killed by SIGKILL`; `None` is the
/// exit of a process keter did not start itself, whose status only its parent learns.
pub fn describe_exit(status: Option<ExitStatus>) -> String {
    let Some(status) = status else {
        return "an unknown status (an earlier keter started it)".to_string();
    };
    if let Some(code) = status.code() {
        format!("exit code {code}")
    } else if let Some(sig) = status.signal() {
        match Signal::try_from(sig) {
            Ok(s) => format!("killed by {}", s.as_str()),
            Err(_) => format!("killed by signal {sig}"),
        }
    } else {
        format!("{status}")
    }
}

/// How a group stop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// Every member exited after SIGTERM (or was already gone).
    Terminated,
    /// SIGKILL was needed after the grace period.
    Killed,
}

/// Stops every process of group `pgid`: SIGTERM, up to `grace` for them to exit, then SIGKILL.
/// Returns once no member is left (or after a further few seconds if SIGKILL cannot finish).
pub fn stop_group(pgid: i32, grace: Duration) -> Stopped {
    let group = Pid::from_raw(-pgid);
    if procfs::group_members(pgid).is_empty() {
        return Stopped::Terminated;
    }
    let _ = signal::kill(group, Signal::SIGTERM);
    // Stopped processes do not act on SIGTERM until continued.
    let _ = signal::kill(group, Signal::SIGCONT);
    if wait_group_gone(pgid, grace) {
        return Stopped::Terminated;
    }
    let _ = signal::kill(group, Signal::SIGKILL);
    wait_group_gone(pgid, Duration::from_secs(5));
    Stopped::Killed
}

fn wait_group_gone(pgid: i32, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    let mut pause = Duration::from_millis(2);
    loop {
        if procfs::group_members(pgid).is_empty() {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        std::thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(25));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> libc::c_int {
        // SAFETY: a plain system call about the calling thread.
        unsafe { libc::sched_getscheduler(0) }
    }

    #[test]
    fn idle_work_runs_idle_then_normal_after_the_grace_and_the_caller_never_changes() {
        let before = policy();
        // A grace longer than the work: it runs idle from its first instruction.
        assert_eq!(
            when_idle(Duration::from_secs(600), policy),
            libc::SCHED_IDLE
        );
        // Work that outlasts its grace gets the normal policy back (waited for, not timed:
        // the caller switches it once the grace has passed, however busy the machine is).
        let after_grace = when_idle(Duration::from_millis(20), || {
            let give_up = std::time::Instant::now() + Duration::from_secs(60);
            while policy() != libc::SCHED_OTHER && std::time::Instant::now() < give_up {
                std::thread::sleep(Duration::from_millis(5));
            }
            policy()
        });
        assert_eq!(after_grace, libc::SCHED_OTHER);
        assert_eq!(policy(), before);
        assert_eq!(when_idle(Duration::from_secs(5), || 7), 7);
    }
}
