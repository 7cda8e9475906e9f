//! The slow stages of a deploy, run off the worker's loop (README, "How a deploy works"):
//! [`prepare`] (unpack, validate, claim hosts, provision, plan the processes), [`readiness`]
//! (poll every webapp's health check) and [`switch`] (render the site and have Nginx take it);
//! and [`discard`], the disposal of a version that failed or was replaced. Each stage's
//! result goes back to the worker as an event (`machine.rs`).

use std::collections::BTreeMap;
use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::EventSender;
use super::Shared as Context;
use super::error::{DeployError, NotReady};
use super::machine::Event;
use super::site::{SiteError, SiteSource, site_of};
use super::version::{self, FileStamp, Proc, Role, Version};
use crate::applog::AppLog;
use crate::bundle::{self, BundleConfig, PathError, Tls};
use crate::isolation::Isolation;
use crate::names::{AppName, Host};
use crate::nginx::{CertFiles, Site};
use crate::probe::{self, ProbeError};
use crate::process::{self, RunAs, Spec};
use crate::procfs;
use crate::restart::Policy;

/// Unpacking runs only on otherwise idle CPU for this long, then at the normal priority.
const UNPACK_IDLE_GRACE: Duration = Duration::from_millis(100);
/// Readiness is polled after 1 ms, then at doubling intervals up to every 20 ms (README, "How
/// a deploy works", step 5): most apps listen within milliseconds of exec.
const READINESS_POLL_FIRST: Duration = Duration::from_millis(1);
const READINESS_POLL: Duration = Duration::from_millis(20);

/// The unpack stage of deploy `id`.
#[derive(Debug, Clone)]
pub(super) struct PrepareJob {
    pub id: u64,
    pub path: PathBuf,
    /// The serving version's checksum: the same content is no new version.
    pub serving_sha256: Option<String>,
    pub started: Instant,
}

/// What the unpack stage made.
pub(super) enum Prepared {
    /// The bundle has the serving version's content.
    SameContent,
    /// A version ready to start: folder unpacked and handed over, hosts claimed, database
    /// provided, ports held, processes planned (not started).
    Version(Box<Version>),
}

/// One webapp's readiness check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Check {
    pub port: u16,
    /// Leader of the webapp's process group: only its listener counts.
    pub pid: i32,
    pub host: String,
    pub path: String,
    pub timeout: Duration,
}

/// The switch stage of a version: what its site is made from.
#[derive(Debug, Clone)]
pub(super) struct SwitchJob {
    pub version: u64,
    pub deploy: u64,
    pub sha256: String,
    pub config: BundleConfig,
    /// (webapp index, port) of each webapp.
    pub ports: Vec<(usize, u16)>,
    /// When the bundle was picked up, for the log.
    pub started: Instant,
    /// The maintenance page every request gets instead (`maintenance.rs`), if any.
    pub maintenance: Option<String>,
}

/// Unpacks the bundle into `temp/NAME-ID`, reads its config, claims its hosts, provides its
/// database and plans its processes. On failure nothing of it is left but host claims, which
/// the worker gives back.
pub(super) fn prepare(
    ctx: &Context,
    name: &AppName,
    job: &PrepareJob,
) -> Result<Prepared, DeployError> {
    let path = &job.path;
    // Opened once, not through a symlink and never blocking on a FIFO: a deployer may swap
    // the name for a link to a bundle it cannot read, or for a FIFO, at any moment.
    let (file, st) = bundle::unpack::open_bundle(path).map_err(DeployError::Bundle)?;
    // The app's user is looked up (on its first deploy, created: `useradd` runs one at a time,
    // src/isolation/users.rs) while the bundle unpacks, not after: in a burst of new apps the
    // users are made one by one from the first pick-up on, alongside the unpacks.
    std::thread::scope(|scope| {
        let user = std::thread::Builder::new()
            .name(format!("user-{name}"))
            .spawn_scoped(scope, || ctx.isolation.user_of(name))
            .ok();
        prepare_opened(ctx, name, job, file, st, user)
    })
}

/// [`prepare`] once the bundle is open, with the lookup of the app's user under way (`None`:
/// no thread could be had, and it is looked up here).
fn prepare_opened(
    ctx: &Context,
    name: &AppName,
    job: &PrepareJob,
    file: fs::File,
    st: nix::sys::stat::FileStat,
    user: Option<
        std::thread::ScopedJoinHandle<'_, Result<Option<RunAs>, crate::isolation::IsolationError>>,
    >,
) -> Result<Prepared, DeployError> {
    let path = &job.path;
    let stamp = FileStamp::of_stat(&st);
    let config = &ctx.config;
    let dir = version_dir(ctx, name, job.id);
    let mut progress = bundle::log_progress(name.to_string());
    // The release's copy is read from this same open file once the unpack has hashed it.
    let kept = file.try_clone();
    let unpacked = process::when_idle(UNPACK_IDLE_GRACE, || {
        bundle::unpack_with_progress(file, path, &dir, &config.limits, &mut progress)
    })
    .map_err(DeployError::Unpack)?;
    log::info!(
        "{name}: unpacked {} bytes in {} entries into {} in {} ms",
        unpacked.bytes,
        unpacked.entries,
        dir.display(),
        job.started.elapsed().as_millis()
    );
    let certs_dir = version_certs_dir(&config.root, name, job.id);
    let cleanup = |e: DeployError| {
        let _ = fs::remove_dir_all(&dir);
        let _ = fs::remove_dir_all(&certs_dir);
        e
    };
    if job.serving_sha256.as_deref() == Some(unpacked.sha256.as_str()) {
        let _ = fs::remove_dir_all(&dir);
        return Ok(Prepared::SameContent);
    }
    let arrival = super::releases::Arrival {
        sha256: unpacked.sha256.clone(),
        size: st.st_size as u64,
        owner: st.st_uid,
        owner_name: nix::unistd::User::from_uid(st.st_uid.into())
            .ok()
            .flatten()
            .map(|u| u.name),
        rollback: None,
    };
    if let Err(e) = kept.and_then(|f| keep_bundle(&config.root, name, &f, &unpacked.sha256)) {
        // The deploy goes on: only a rollback to this release would miss the file.
        log::warn!(
            "{name}: the bundle is not kept as a release ({}): {e}",
            super::releases::Releases::dir(&config.root, name).display()
        );
    }
    // Files on the host that the bundle names are read with its deployer's rights.
    let reader = (st.st_uid != nix::unistd::geteuid().as_raw())
        .then(|| crate::isolation::access::Ids::of_owner(st.st_uid, st.st_gid));
    let check = bundle::Context {
        reader,
        ..bundle::Context::of(config)
    };
    let (bundle_config, warnings) = bundle::read_config(&dir, &format!("{name}.keter"), &check)
        .map_err(|e| cleanup(DeployError::Config(e)))?;
    for w in &warnings.warnings {
        log::warn!("{w}");
    }
    // Kept with the version so that a later keter reads the same configuration, whatever the
    // app's user does to the folder meanwhile.
    let config_text = ["config/keter.yaml", "config/keter.yml"]
        .iter()
        .map(|p| dir.join(p))
        .filter(|p| p.symlink_metadata().is_ok_and(|m| m.is_file()))
        .find_map(|p| fs::read_to_string(p).ok())
        .unwrap_or_default();
    // Read now, while only keter can reach the folder: Nginx serves these copies.
    let real_dir = dir.canonicalize().unwrap_or_else(|_| dir.clone());
    let reader = check.reader.as_ref().map(|ids| bundle::certs::Deployer {
        ids,
        bundle: &real_dir,
    });
    copy_certificates(&bundle_config, &certs_dir, reader)
        .map_err(|e| cleanup(DeployError::Site(e)))?;
    // Resolved now, as the checks resolved them: once the folder is the app's, a path in it
    // means whatever the app makes it mean.
    let execs = resolve_execs(&dir, &bundle_config);
    let isolation = &ctx.isolation;
    let roots = static_roots(&bundle_config);
    let user = match user.map(|u| u.join()) {
        Some(Ok(user)) => user,
        Some(Err(panic)) => std::panic::resume_unwind(panic),
        None => isolation.user_of(name),
    };
    let user = user
        .and_then(|user| {
            isolation
                .hand_over(&dir, user.as_ref(), &roots, ctx.nginx.master_pid())
                .map(|()| user)
        })
        .map_err(|e| cleanup(DeployError::Isolation(e)))?;
    claim_hosts(ctx, name, &bundle_config).map_err(cleanup)?;
    let plugin_env = provision(ctx, name, &bundle_config).map_err(cleanup)?;
    let mut version = Version {
        id: job.id,
        dir: dir.clone(),
        sha256: unpacked.sha256,
        stamp,
        config: bundle_config,
        config_text,
        plugin_env,
        user,
        procs: Vec::new(),
        deploy: 0,
        modified: std::time::UNIX_EPOCH.checked_add(Duration::new(
            st.st_mtime.max(0) as u64,
            st.st_mtime_nsec.clamp(0, 999_999_999) as u32,
        )),
        live_since: None,
        arrival: Some(arrival),
    };
    if let Err(e) = plan(ctx, &mut version, execs) {
        discard(ctx, name, version);
        return Err(e);
    }
    Ok(Prepared::Version(Box::new(version)))
}

/// Copies the bundle just unpacked into `ROOT/releases/NAME/SHA256.keter` (README "Releases
/// and rollback"), unless that content is kept already: read with `pread` from the very
/// descriptor the unpack read (a deployer may replace or rewrite the name in `incoming/` at
/// any moment), written under a hidden name that only root can reach and renamed once its
/// own checksum is the unpack's (a file rewritten in place meanwhile is not kept).
fn keep_bundle(root: &Path, name: &AppName, file: &fs::File, sha256: &str) -> std::io::Result<()> {
    use sha2::Digest;
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
    let dir = super::releases::Releases::dir(root, name);
    let target = dir.join(format!("{sha256}.keter"));
    if target.symlink_metadata().is_ok() {
        return Ok(());
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)?;
    let part = dir.join(format!(".{sha256}.part"));
    let _ = fs::remove_file(&part);
    let mut out = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&part)?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut at = 0u64;
    let copied = loop {
        let n = match file.read_at(&mut buf, at) {
            Ok(0) => break Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => break Err(e),
        };
        hasher.update(&buf[..n]);
        if let Err(e) = out.write_all(&buf[..n]) {
            break Err(e);
        }
        at += n as u64;
    };
    let done = copied
        .and_then(|()| out.sync_data())
        .and_then(|()| {
            let got: String = hasher
                .finalize()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            if got == sha256 {
                Ok(())
            } else {
                Err(std::io::Error::other(
                    "the file changed after it was unpacked",
                ))
            }
        })
        .and_then(|()| fs::rename(&part, &target));
    if done.is_err() {
        let _ = fs::remove_file(&part);
    }
    done
}

/// The programs of a version's stanzas in the order `plan` starts them (background stanzas
/// first, then webapps), resolved inside `dir`.
fn resolve_execs(dir: &Path, config: &BundleConfig) -> Vec<Result<PathBuf, PathError>> {
    config
        .background
        .iter()
        .map(|b| &b.program)
        .chain(config.webapps.iter().map(|w| &w.program))
        .map(|p| bundle::resolve_exec(dir, &p.exec))
        .collect()
}

/// The processes of a version, not started: background stanzas first, then webapps (Keter's
/// order), each webapp with a port of its own. `execs` are their programs, from
/// [`resolve_execs`].
fn plan(
    ctx: &Context,
    version: &mut Version,
    execs: Vec<Result<PathBuf, PathError>>,
) -> Result<(), DeployError> {
    let config = &ctx.config;
    let background = version
        .config
        .background
        .iter()
        .enumerate()
        .map(|(index, b)| {
            let policy = Policy::Fixed {
                delay: b.restart_delay,
                count: b.restart_count,
            };
            (Role::Background { index }, b.program.clone(), None, policy)
        });
    let web = version.config.webapps.iter().enumerate().map(|(index, w)| {
        let role = Role::Web { index, port: 0 };
        (role, w.program.clone(), Some(w.clone()), Policy::WEBAPP)
    });
    let planned: Vec<_> = background.chain(web).collect();
    // Room for exactly these: the version keeps its processes for as long as it runs, and
    // pushing into an empty list makes room for four.
    version.procs.reserve_exact(planned.len());
    for ((role, program, webapp, policy), resolved) in planned.into_iter().zip(execs) {
        let (role, port) = match role {
            Role::Web { index, .. } => {
                let port = ctx
                    .ports
                    .acquire()
                    .ok_or_else(|| DeployError::NoFreePort(config.port_range.clone()))?;
                (Role::Web { index, port }, Some(port))
            }
            role => (role, None),
        };
        let web = webapp.as_ref().zip(port);
        let spec = Spec {
            program: resolved.as_ref().cloned().unwrap_or_default(),
            args: program.args.clone(),
            cwd: version.dir.clone(),
            env: version::environment(
                config,
                &version.plugin_env,
                &program,
                web,
                &Isolation::home(version.user.as_ref()),
            ),
            user: version.user.clone(),
            limits: program.limits.or(config.process_limits),
        };
        // Recorded before anything can fail, so that `discard` frees the port.
        version.procs.push(Proc::new(role, spec, policy));
        if let Err(source) = resolved {
            return Err(DeployError::Stanza {
                key: program.key("exec"),
                source,
            });
        }
    }
    Ok(())
}

/// Polls each webapp's health check in turn until it answers below 500 from the version's own
/// process group, the readiness timeout passes, or `cancel` is set (the process exited, or a
/// newer command came). `last` always holds what the last check saw.
pub(super) fn readiness(
    ctx: &Context,
    name: &AppName,
    log: &AppLog,
    checks: &[Check],
    cancel: &AtomicBool,
    last: &Mutex<String>,
) -> Result<(), DeployError> {
    for check in checks {
        let waited = ready(check, log, cancel, last)?;
        ctx.reports.readiness_wait.observe(waited);
        log::info!(
            "{name}: ready on port {} after {} ms",
            check.port,
            waited.as_millis()
        );
    }
    if cancel.load(Ordering::Relaxed) {
        return Err(cancelled(last));
    }
    Ok(())
}

/// The app's last output lines, for a readiness failure.
pub(super) fn last_output(log: &AppLog) -> String {
    let lines = log.tail(5);
    if lines.is_empty() {
        "; the app printed nothing".to_string()
    } else {
        format!("; last output: {}", lines.join(" | "))
    }
}

fn cancelled(last: &Mutex<String>) -> DeployError {
    DeployError::NotReady(NotReady::Timeout {
        timeout: Duration::ZERO,
        last: last.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        output: String::new(),
    })
}

/// One webapp's readiness: how long it took.
fn ready(
    check: &Check,
    log: &AppLog,
    cancel: &AtomicBool,
    last: &Mutex<String>,
) -> Result<Duration, DeployError> {
    let start = Instant::now();
    let deadline = start + check.timeout;
    let port = check.port;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let (host, path) = (check.host.as_str(), check.path.as_str());
    let set = |text: String| *last.lock().unwrap_or_else(|e| e.into_inner()) = text;
    set(format!("never listened on port {port}"));
    let mut poll = READINESS_POLL_FIRST;
    loop {
        if cancel.load(Ordering::Relaxed) {
            return Err(cancelled(last));
        }
        let per_try = deadline
            .saturating_duration_since(Instant::now())
            .clamp(Duration::from_millis(50), Duration::from_secs(2));
        match probe::ready(addr, host, path, per_try) {
            Ok(status) if status < 500 => {
                // Readiness must come from this version's processes, not from a stale
                // process of someone else that took the port.
                if procfs::port_listener_in_group(port, check.pid) {
                    return Ok(start.elapsed());
                }
                set(format!(
                    "port {port} is answered by a process that is not this app's"
                ));
            }
            Ok(status) => set(format!("GET {path} (Host: {host}) answered {status}")),
            Err(ProbeError::Refused) => {}
            Err(e) => set(format!("GET {path} (Host: {host}) failed: {e}")),
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(DeployError::NotReady(NotReady::Timeout {
                timeout: check.timeout,
                last: last.lock().unwrap_or_else(|e| e.into_inner()).clone(),
                output: last_output(log),
            }));
        }
        std::thread::sleep(poll.min(deadline - now));
        poll = (poll * 2).min(READINESS_POLL);
    }
}

/// Renders the version's site and has Nginx take it; returns once Nginx runs it. New
/// certificates of its `ssl: acme` stanzas come back to the worker over `tx`.
pub(super) fn switch(
    ctx: &Context,
    name: &AppName,
    job: &SwitchJob,
    tx: &EventSender,
) -> Result<(), DeployError> {
    let site = site_for(ctx, name, job, tx)?;
    let switching = Instant::now();
    let generation = ctx
        .nginx
        .apply(name, Some(site))
        .map_err(DeployError::Nginx)?;
    log::info!(
        "{name}: switched to deploy {} (sha256 {}) at Nginx generation {generation} in {} ms, {} ms after the bundle was picked up",
        job.deploy,
        &job.sha256[..12],
        switching.elapsed().as_millis(),
        job.started.elapsed().as_millis()
    );
    Ok(())
}

/// The plugins' variables for this bundle (none unless it asks for postgres). Runs on a
/// plain thread: the sync postgres client must not run on tokio.
fn provision(
    ctx: &Context,
    name: &AppName,
    config: &BundleConfig,
) -> Result<BTreeMap<String, String>, DeployError> {
    if !config.postgres {
        return Ok(Default::default());
    }
    let pg = ctx.postgres.as_ref().ok_or(DeployError::NoPostgresServer)?;
    let started = Instant::now();
    let creds = pg.provision(name).map_err(DeployError::Postgres)?;
    log::info!(
        "{name}: database {} (role {}) on {} ready in {} ms",
        creds.database,
        creds.role,
        creds.server,
        started.elapsed().as_millis()
    );
    Ok(creds.env())
}

/// What Nginx serves for this version: one block per stanza with hosts.
pub(super) fn site_for(
    ctx: &Context,
    name: &AppName,
    job: &SwitchJob,
    tx: &EventSender,
) -> Result<Site, DeployError> {
    let mut certs = |tls: &Tls, hosts: &[Host], origin: &str| match tls {
        Tls::Acme => Ok(acme_certificate(ctx, hosts, tx)),
        _ => copy_certificate(ctx, name, job, tls, origin),
    };
    let site = site_of(
        &ctx.config,
        &SiteSource {
            app: name,
            bundle: &job.config,
            sha256: &job.sha256,
            deploy: job.deploy,
            ports: &job.ports,
        },
        &mut certs,
    )
    .map_err(DeployError::Site)?;
    let mut site = site;
    if let Some(html) = &job.maintenance {
        let file = crate::nginx::SiteFile::new(html.as_bytes().to_vec(), "html");
        site.maintenance = Some(file.name.clone());
        site.files.push(file);
    }
    let has_tls = ctx.config.listeners.iter().any(|l| l.is_tls());
    if !has_tls && site.blocks.iter().any(|b| b.requires_secure || b.acme) {
        log::warn!(
            "{name}: requires-secure or ssl: acme is set but keter has no TLS listener; plain HTTP is served"
        );
    }
    Ok(site)
}

/// The certificate of an `ssl: acme` stanza's hosts if one is stored and usable, asking the
/// ACME thread to obtain it (or keep it renewed) either way; never waits for the CA. Each new
/// certificate comes back to the worker as [`Event::Certificate`].
fn acme_certificate(ctx: &Context, hosts: &[Host], tx: &EventSender) -> Option<CertFiles> {
    let acme = ctx.acme.as_ref()?;
    let set = bundle::config::acme_set(hosts)?;
    let tx = tx.clone();
    let label = set.to_string();
    let cert = acme.want(&set, move |_| {
        let _ = tx.send(Event::Certificate {
            hosts: label.clone(),
        });
    })?;
    Some(CertFiles {
        certificate: cert.path.clone(),
        key: cert.path,
    })
}

/// The copies of a stanza's own certificate that Nginx reads, made when the version was
/// prepared (`copy_certificates`): never read again from the bundle, which is the app's by
/// now. `origin` is the stanza's `ssl` key.
fn copy_certificate(
    ctx: &Context,
    name: &AppName,
    job: &SwitchJob,
    tls: &Tls,
    origin: &str,
) -> Result<Option<CertFiles>, SiteError> {
    if !matches!(tls, Tls::Own { .. }) {
        return Ok(None);
    }
    let dir = version_certs_dir(&ctx.config.root, name, job.version);
    let (certificate, key) = certificate_copies(&dir, origin);
    if certificate.exists() && key.exists() {
        return Ok(Some(CertFiles { certificate, key }));
    }
    // A version prepared by a keter before per-stanza copies, taken over: its one pair.
    let (certificate, key) = (dir.join("certificate.pem"), dir.join("key.pem"));
    if certificate.exists() && key.exists() {
        return Ok(Some(CertFiles { certificate, key }));
    }
    Err(SiteError::CopyMissing {
        origin: origin.to_string(),
        dir,
    })
}

/// Copies every stanza's own certificate (from the bundle, or from the host with `reader`'s
/// rights) into `dir` = `ROOT/etc/certs/NAME-ID/` (mode 0600, chain appended), so that Nginx
/// reads files that neither the app nor the deployer can change.
fn copy_certificates(
    config: &BundleConfig,
    dir: &Path,
    reader: bundle::certs::Reader,
) -> Result<(), SiteError> {
    for (tls, _, origin) in config.tls_stanzas() {
        let read = bundle::certs::read_own(tls, reader);
        let Some(bytes) = read.map_err(|source| SiteError::Certificate {
            origin: origin.clone(),
            source,
        })?
        else {
            continue;
        };
        let (certificate, key) = certificate_copies(dir, &origin);
        write_private(&certificate, &bytes.certificate)
            .and_then(|()| write_private(&key, &bytes.key))
            .map_err(|source| SiteError::Copy {
                origin: origin.clone(),
                source,
            })?;
    }
    Ok(())
}

/// Where the copies of the certificate of the stanza whose `ssl` key is `origin` are kept:
/// one pair per stanza (`stanzas[2].ssl` becomes `stanzas_2_.ssl-certificate.pem`).
fn certificate_copies(dir: &Path, origin: &str) -> (PathBuf, PathBuf) {
    let stem: String = origin
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    (
        dir.join(format!("{stem}-certificate.pem")),
        dir.join(format!("{stem}-key.pem")),
    )
}

/// The static roots Nginx serves for this configuration (absolute, as checked).
fn static_roots(config: &BundleConfig) -> Vec<PathBuf> {
    config
        .statics
        .iter()
        .filter(|s| !s.served.routed.is_empty())
        .map(|s| s.root.clone())
        .collect()
}

/// Reserves this bundle's hosts for the app; refused if another app serves one of them.
fn claim_hosts(ctx: &Context, name: &AppName, config: &BundleConfig) -> Result<(), DeployError> {
    let mut hosts = ctx.hosts.lock().unwrap_or_else(|e| e.into_inner());
    for h in config.hosts() {
        if let Some(owner) = hosts.get(h)
            && owner != name
        {
            return Err(DeployError::HostTaken {
                host: h.clone(),
                owner: owner.clone(),
            });
        }
    }
    for h in config.hosts() {
        hosts.insert(h.clone(), name.clone());
    }
    Ok(())
}

/// Stops a version's processes, frees its ports and deletes its folder.
pub(super) fn discard(ctx: &Context, name: &AppName, version: Version) {
    let grace = ctx.config.stop_timeout;
    for p in &version.procs {
        if let Some(r) = p.running() {
            version::stop(name, &p.label(), r.pid, grace);
            ctx.journal.remove(r.pid);
        }
        if let Some(port) = p.port().filter(|p| *p != 0) {
            ctx.ports.release(port);
        }
    }
    // What is left of the version (a process that left its process group with `setsid()`)
    // is in its control group: killed with it, and the group removed.
    if let Some(cgroups) = crate::cgroup::get() {
        cgroups.remove(&crate::cgroup::version_group(name.as_str(), version.id));
    }
    let certs = version_certs_dir(&ctx.config.root, name, version.id);
    if certs.exists() {
        let _ = fs::remove_dir_all(&certs);
    }
    match fs::remove_dir_all(&version.dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            log::warn!("{name}: cannot delete {}: {e}", version.dir.display())
        }
        _ => {}
    }
}

/// The unpacked folder of version `id`: `temp/NAME-ID`.
fn version_dir(ctx: &Context, name: &AppName, id: u64) -> PathBuf {
    ctx.config.root.join("temp").join(format!("{name}-{id}"))
}

/// Where a version's own certificates are kept.
fn version_certs_dir(root: &Path, app: &AppName, id: u64) -> PathBuf {
    root.join("etc").join("certs").join(format!("{app}-{id}"))
}

/// Writes a file only its owner can read, created with that mode (never widened first), in a
/// folder only its owner can enter.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if let Some(dir) = path.parent() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    crate::atomic_file::replace(path, bytes, 0o600)
}
