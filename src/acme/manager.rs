//! The ACME thread: the one owner of certificate state. Callers (the app workers) say which
//! host sets want a certificate; the thread obtains each one, renews it at two thirds of its
//! lifetime, retries failures with backoff, stores the files and tells the caller when a new
//! certificate is in place. Nothing a caller does waits for the CA.
//!
//! The thread runs a single-threaded tokio runtime of its own for the ACME client, one
//! attempt at a time (a CA's rate limits favour that, and a deploy never waits for it). It
//! shares no runtime with the status server and runs nothing else, so blocking work (the
//! postgres client) never meets it.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, unbounded};

use super::certificate::Certificate;
use super::client::{Ca, TlsSetupError};
use super::config::AcmeConfig;
use super::hosts::HostSet;
use super::schedule::{CertStatus, Scheduler};
use super::store::{FileError, Store};
use crate::report::rfc3339;

/// Why the ACME thread cannot start.
#[derive(Debug)]
pub enum StartError {
    /// Its folder cannot be made.
    Store(FileError),
    /// Its runtime cannot be made.
    Runtime(std::io::Error),
    /// No HTTPS client for the CA can be made.
    Tls(TlsSetupError),
    /// Its thread cannot be started.
    Thread(std::io::Error),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::Store(e) => write!(f, "{e}"),
            StartError::Runtime(e) => write!(f, "cannot start the ACME client's runtime: {e}"),
            StartError::Tls(e) => write!(f, "{e}"),
            StartError::Thread(e) => write!(f, "cannot start the ACME thread: {e}"),
        }
    }
}

impl std::error::Error for StartError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StartError::Store(e) => Some(e),
            StartError::Runtime(e) | StartError::Thread(e) => Some(e),
            StartError::Tls(e) => Some(e),
        }
    }
}

/// The longest the thread sleeps before looking at the wall clock again (a suspended machine
/// or a clock set forward is noticed within this).
const MAX_SLEEP: Duration = Duration::from_secs(600);

/// Where "now" comes from; a test can hand in another clock.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> SystemTime;
}

/// The system's wall clock (certificates' dates are wall-clock times).
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// Called on the ACME thread each time a new certificate for the host set is stored (first
/// obtained or renewed). It must return quickly: send a message, do not render Nginx here.
pub type OnCertificate = Box<dyn Fn(&Certificate) + Send + 'static>;

enum Request {
    Want(HostSet, Option<Certificate>, OnCertificate),
    Release(HostSet),
    RenewNow(HostSet),
}

/// The handle of the ACME thread; it may be shared between threads (`Acme` is `Sync`).
/// [`Acme::stop`], or dropping it, stops the thread: an attempt in progress is abandoned and
/// its challenge files removed.
pub struct Acme {
    /// `None` once stopped.
    tx: Mutex<Option<Sender<Request>>>,
    stopping: Arc<Stop>,
    statuses: Arc<Mutex<Vec<CertStatus>>>,
    store: Store,
    clock: Arc<dyn Clock>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

struct Stop {
    flag: AtomicBool,
    notify: tokio::sync::Notify,
}

impl Acme {
    /// Starts the thread for keter's root whose `etc/` folder is `etc`; challenge answers go
    /// into `webroot` (the `acme-webroot` that Nginx serves).
    pub fn start(config: AcmeConfig, etc: &Path, webroot: &Path) -> Result<Acme, StartError> {
        Acme::start_with_clock(config, etc, webroot, Arc::new(SystemClock))
    }

    pub fn start_with_clock(
        config: AcmeConfig,
        etc: &Path,
        webroot: &Path,
        clock: Arc<dyn Clock>,
    ) -> Result<Acme, StartError> {
        let store = Store::new(etc);
        store.prepare().map_err(StartError::Store)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(StartError::Runtime)?;
        let directory = config.directory.clone();
        let retry = config.retry;
        let ca = Ca::new(config, store.clone(), webroot.to_path_buf()).map_err(StartError::Tls)?;
        let (tx, rx) = unbounded();
        let stopping = Arc::new(Stop {
            flag: AtomicBool::new(false),
            notify: tokio::sync::Notify::new(),
        });
        let statuses = Arc::new(Mutex::new(Vec::new()));
        let worker = Worker {
            rx,
            ca,
            directory,
            runtime,
            scheduler: Scheduler::new(retry),
            subscribers: BTreeMap::new(),
            stopping: stopping.clone(),
            statuses: statuses.clone(),
            clock: clock.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("acme".into())
            .spawn(move || worker.run())
            .map_err(StartError::Thread)?;
        Ok(Acme {
            tx: Mutex::new(Some(tx)),
            stopping,
            statuses,
            store,
            clock,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Wants a certificate for `hosts`, kept renewed until [`Acme::release`]. Returns the
    /// stored certificate if one is usable now (so a restarted keter serves HTTPS at once),
    /// without waiting for the CA; `on_certificate` is called for every new one after that.
    /// Asking again for a set (a redeploy) replaces its `on_certificate` and keeps its
    /// schedule.
    pub fn want(
        &self,
        hosts: &HostSet,
        on_certificate: impl Fn(&Certificate) + Send + 'static,
    ) -> Option<Certificate> {
        let stored = match self.store.load_certificate(hosts, self.clock.now()) {
            Ok(c) => c,
            Err(e) => {
                log::warn!("acme: {hosts}: not reusing the stored certificate: {e}");
                None
            }
        };
        self.send(Request::Want(
            hosts.clone(),
            stored.clone(),
            Box::new(on_certificate),
        ));
        stored
    }

    /// No longer renews `hosts` (the app was removed or asks for other hosts). The files stay,
    /// so that a later deploy asking for the same hosts reuses them.
    pub fn release(&self, hosts: &HostSet) {
        self.send(Request::Release(hosts.clone()));
    }

    /// Renews `hosts` now, whatever the certificate's age.
    pub fn renew_now(&self, hosts: &HostSet) {
        self.send(Request::RenewNow(hosts.clone()));
    }

    /// The status of `hosts`, once the thread has taken the request in.
    pub fn status(&self, hosts: &HostSet) -> Option<CertStatus> {
        let name = hosts.file_stem();
        self.statuses().into_iter().find(|s| s.name == name)
    }

    /// Every wanted host set's status, as of the thread's last step.
    pub fn statuses(&self) -> Vec<CertStatus> {
        lock(&self.statuses).clone()
    }

    /// Stops the thread and waits for it; later requests are ignored.
    pub fn stop(&self) {
        self.stopping.flag.store(true, Ordering::SeqCst);
        self.stopping.notify.notify_one();
        lock(&self.tx).take();
        if let Some(t) = lock(&self.thread).take() {
            let _ = t.join();
        }
    }

    fn send(&self, r: Request) {
        if let Some(tx) = lock(&self.tx).as_ref() {
            let _ = tx.send(r);
        }
    }
}

impl Drop for Acme {
    fn drop(&mut self) {
        self.stop();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The thread's state.
struct Worker {
    rx: Receiver<Request>,
    ca: Ca,
    directory: String,
    runtime: tokio::runtime::Runtime,
    scheduler: Scheduler,
    subscribers: BTreeMap<HostSet, OnCertificate>,
    stopping: Arc<Stop>,
    statuses: Arc<Mutex<Vec<CertStatus>>>,
    clock: Arc<dyn Clock>,
}

impl Worker {
    fn run(mut self) {
        loop {
            while let Ok(r) = self.rx.try_recv() {
                self.handle(r);
            }
            if self.stopping.flag.load(Ordering::SeqCst) {
                break;
            }
            let now = self.clock.now();
            self.publish(now);
            if let Some(hosts) = self.scheduler.due(now) {
                self.attempt(&hosts);
                continue;
            }
            let received = match self.scheduler.next_wakeup() {
                None => self.rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
                Some(at) => {
                    let wait = at.duration_since(now).unwrap_or(Duration::ZERO);
                    self.rx.recv_timeout(wait.min(MAX_SLEEP))
                }
            };
            match received {
                Ok(r) => self.handle(r),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
    }

    fn handle(&mut self, r: Request) {
        let now = self.clock.now();
        match r {
            Request::Want(hosts, stored, on_certificate) => {
                self.scheduler.want(&hosts, stored, now);
                self.subscribers.insert(hosts, on_certificate);
            }
            Request::Release(hosts) => {
                self.scheduler.release(&hosts);
                self.subscribers.remove(&hosts);
            }
            Request::RenewNow(hosts) => self.scheduler.force(&hosts, now),
        }
    }

    fn attempt(&mut self, hosts: &HostSet) {
        let renewal = self.scheduler.certificate(hosts).is_some();
        log::info!(
            "acme: {hosts}: {} a certificate from {}",
            if renewal { "renewing" } else { "obtaining" },
            self.directory
        );
        let ca = &self.ca;
        let stopping = &self.stopping;
        let result = self.runtime.block_on(async {
            tokio::select! {
                r = ca.obtain(hosts) => Some(r),
                _ = stopping.notify.notified() => None,
            }
        });
        let now = self.clock.now();
        match result {
            None => {}
            Some(Ok(cert)) => {
                log::info!(
                    "acme: {hosts}: certificate {} stored in {}, valid until {}, renewal due {}",
                    cert.serial,
                    cert.path.display(),
                    rfc3339(cert.not_after),
                    rfc3339(cert.renew_at())
                );
                self.scheduler.succeeded(hosts, cert.clone(), now);
                if let Some(notify) = self.subscribers.get(hosts) {
                    notify(&cert);
                }
            }
            Some(Err(e)) => {
                if let Some(next) = self.scheduler.failed(hosts, &e, now) {
                    log::warn!("acme: {hosts}: {}; next attempt at {}", e, rfc3339(next));
                }
            }
        }
        self.publish(now);
    }

    fn publish(&self, now: SystemTime) {
        *lock(&self.statuses) = self.scheduler.statuses(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_handle_can_be_shared_between_threads() {
        fn shareable<T: Send + Sync>() {}
        shareable::<Acme>();
    }
}
