//! Continuous requests, as the sites behind keter get them while keter itself is upgraded or
//! killed: on each host, clients on new connections and clients that keep their connection
//! alive (and resend an idempotent request that the server closed before answering, as
//! browsers and curl do). Every request carries an id that the example app logs
//! (`--log-requests`), so a test can check that each answered request's line reached the
//! app's log file.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::support::KeepAliveClient;

/// What the clients saw.
#[derive(Debug, Default)]
pub struct Tally {
    pub ok: u64,
    /// Each failed request: host, id and what went wrong.
    pub failures: Vec<String>,
    /// When each of `failures` was sent, in the same order.
    pub failed_at: Vec<Instant>,
    /// Ids of the answered requests and when each was answered, by host.
    pub answered: BTreeMap<String, Vec<(String, Instant)>>,
    /// Requests a kept-alive client resent after the server closed the idle connection.
    pub resent: u32,
    /// Failures of the clients that do not resend.
    pub blunt_failures: Vec<String>,
}

impl Tally {
    fn merge(&mut self, other: Tally) {
        self.ok += other.ok;
        self.failures.extend(other.failures);
        self.failed_at.extend(other.failed_at);
        for (h, ids) in other.answered {
            self.answered.entry(h).or_default().extend(ids);
        }
        self.resent += other.resent;
        self.blunt_failures.extend(other.blunt_failures);
    }

    pub fn failed(&self) -> usize {
        self.failures.len()
    }

    /// The ids answered on `host`, those answered within one of `windows` only if given.
    pub fn ids(&self, host: &str, windows: Option<&[(Instant, Instant)]>) -> Vec<String> {
        self.answered
            .get(host)
            .into_iter()
            .flatten()
            .filter(|(_, at)| windows.is_none_or(|w| w.iter().any(|(a, b)| a <= at && at <= b)))
            .map(|(id, _)| id.clone())
            .collect()
    }
}

/// Answered requests as they come: host, id, when.
type Answered = Arc<std::sync::Mutex<Vec<(String, String, Instant)>>>;

/// Clients running until [`Traffic::stop`].
pub struct Traffic {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Tally>>,
    answered: Answered,
}

impl Traffic {
    /// `fresh` clients on new connections and `kept` on kept-alive ones, per host, each
    /// pausing `pause` between requests.
    pub fn start(
        addr: SocketAddr,
        hosts: &[&str],
        fresh: usize,
        kept: usize,
        pause: Duration,
    ) -> Traffic {
        Traffic::with_clients(addr, hosts, fresh, kept, 0, pause)
    }

    /// [`Traffic::start`] with also `blunt` kept-alive clients per host that do not resend a
    /// request the server closed the idle connection under (as `wrk` does not): their
    /// failures are in [`Tally::blunt_failures`], not in `failures`.
    pub fn with_clients(
        addr: SocketAddr,
        hosts: &[&str],
        fresh: usize,
        kept: usize,
        blunt: usize,
        pause: Duration,
    ) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let answered: Answered = Default::default();
        let mut threads = Vec::new();
        for host in hosts {
            for c in 0..fresh + kept + blunt {
                let (stop, host, seen) = (stop.clone(), host.to_string(), answered.clone());
                let kind = if c < fresh {
                    Kind::Fresh
                } else if c < fresh + kept {
                    Kind::Kept
                } else {
                    Kind::Blunt
                };
                let name = format!("{}{c}", kind.letter());
                threads.push(std::thread::spawn(move || {
                    client(addr, &host, &name, kind, pause, &stop, &seen)
                }));
            }
        }
        Traffic {
            stop,
            threads,
            answered,
        }
    }

    /// The ids answered on `host` so far between `from` and `to`.
    pub fn answered_between(&self, host: &str, from: Instant, to: Instant) -> Vec<String> {
        let seen = self.answered.lock().unwrap();
        seen.iter()
            .filter(|(h, _, at)| h == host && from <= *at && *at <= to)
            .map(|(_, id, _)| id.clone())
            .collect()
    }

    pub fn stop(self) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Tally::default();
        for t in self.threads {
            all.merge(t.join().unwrap());
        }
        all
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Fresh,
    Kept,
    Blunt,
}

impl Kind {
    fn letter(self) -> char {
        match self {
            Kind::Fresh => 'f',
            Kind::Kept => 'k',
            Kind::Blunt => 'b',
        }
    }
}

fn client(
    addr: SocketAddr,
    host: &str,
    name: &str,
    kind: Kind,
    pause: Duration,
    stop: &AtomicBool,
    seen: &Answered,
) -> Tally {
    let mut tally = Tally::default();
    let mut kept = KeepAliveClient::new(addr);
    kept.resend = kind != Kind::Blunt;
    let keep_alive = kind != Kind::Fresh;
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let id = format!("{name}-{n}");
        let path = format!("/?id={id}");
        let sent = Instant::now();
        let answer = if keep_alive {
            kept.get(host, &path)
        } else {
            keter::probe::get_tcp(addr, host, &path, Duration::from_secs(10))
        };
        match answer {
            Ok(r) if r.status == 200 => {
                tally.ok += 1;
                let at = Instant::now();
                seen.lock()
                    .unwrap()
                    .push((host.to_string(), id.clone(), at));
                tally
                    .answered
                    .entry(host.to_string())
                    .or_default()
                    .push((id, Instant::now()));
            }
            Ok(r) if kind == Kind::Blunt => tally
                .blunt_failures
                .push(format!("{host} {id}: status {}", r.status)),
            Ok(r) => {
                tally
                    .failures
                    .push(format!("{host} {id}: status {} {:?}", r.status, r.body));
                tally.failed_at.push(sent);
            }
            Err(e) if kind == Kind::Blunt => tally.blunt_failures.push(format!("{host} {id}: {e}")),
            Err(e) => {
                tally.failures.push(format!("{host} {id}: {e}"));
                tally.failed_at.push(sent);
            }
        }
        std::thread::sleep(pause);
    }
    tally.resent = kept.resent_after_idle_close;
    tally
}

/// Waits until every id answered on `host` has its `request /?id=ID` line in the app's log
/// (`log/app-APP.log` and its rotations); returns the ids still missing after `timeout`.
pub fn missing_log_lines(root: &Path, app: &str, ids: &[String], timeout: Duration) -> Vec<String> {
    let start = Instant::now();
    loop {
        let mut text = String::new();
        for entry in std::fs::read_dir(root.join("log")).unwrap().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(&format!("app-{app}.log")) {
                text.push_str(&std::fs::read_to_string(entry.path()).unwrap_or_default());
            }
        }
        let logged: std::collections::HashSet<&str> = text
            .lines()
            .filter_map(|l| l.split_once(" request /?id=").map(|(_, id)| id))
            .collect();
        let missing: Vec<String> = ids
            .iter()
            .filter(|id| !logged.contains(id.as_str()))
            .cloned()
            .collect();
        if missing.is_empty() || start.elapsed() > timeout {
            return missing;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
