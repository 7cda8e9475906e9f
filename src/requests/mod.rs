//! Request metrics (README, "Request metrics"): what Nginx served for each app and each of its
//! releases, as Nginx logs them a line per request into a file keter reads ([`tailer`]), kept in fixed-size
//! counters, histograms and ring buffers ([`Requests`]), shown at `/metrics`, in
//! `/api/apps/NAME` and as plots ([`plot`]) on the status pages.
//!
//! Memory is bounded per app: nothing here grows with the number of requests. Per app, the
//! counters of the last [`KEPT_RELEASES`] releases (deploy numbers) and two rings of time
//! slots, the last hour at [`HOUR`] and the last day at [`DAY`], which take their memory only
//! for the stretches of time the app had traffic in ([`Requests::bytes_per_app`] at most); apps
//! beyond [`MAX_APPS`] are not counted (their lines are counted as dropped).

pub mod line;
pub mod plot;
pub mod tailer;

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

pub use line::{Class, LastTime, Line};

/// Upper bounds (seconds) of the upstream response time buckets; one more bucket above.
pub const LATENCY_BUCKETS: [f64; 15] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
const SLOTS: usize = LATENCY_BUCKETS.len() + 1;

/// Releases whose counters are kept per app: the newest deploy numbers seen.
pub const KEPT_RELEASES: usize = 4;
/// Apps counted at most (far more than one machine serves).
pub const MAX_APPS: usize = 4096;

/// A ring of time slots: how many, and how long each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub slots: usize,
    pub seconds: u64,
}

/// The last hour, at 10 s.
pub const HOUR: Span = Span {
    slots: 360,
    seconds: 10,
};
/// The last day, at 5 min.
pub const DAY: Span = Span {
    slots: 288,
    seconds: 300,
};

/// Requests by status class, bytes, and a histogram of upstream response times.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Counters {
    /// By [`Class`], in [`Class::ALL`] order.
    pub classes: [u64; Class::ALL.len()],
    pub bytes: u64,
    /// Upstream response times, per bucket (not cumulative), the last one above every bound.
    pub latency: [u64; SLOTS],
    pub latency_sum: f64,
}

impl Counters {
    fn add(&mut self, l: &Line) {
        self.classes[l.class() as usize] += 1;
        self.bytes += l.bytes;
        if let Some(s) = l.upstream_seconds() {
            self.latency[bucket(s)] += 1;
            self.latency_sum += s;
        }
    }

    pub fn requests(&self) -> u64 {
        self.classes.iter().sum()
    }

    pub fn latency_count(&self) -> u64 {
        self.latency.iter().sum()
    }
}

fn bucket(seconds: f64) -> usize {
    LATENCY_BUCKETS
        .iter()
        .position(|le| seconds <= *le)
        .unwrap_or(LATENCY_BUCKETS.len())
}

/// The `q` quantile (0..1) of a bucketed distribution, interpolated inside its bucket;
/// `None` without observations. Above the last bound, the last bound.
pub fn quantile(buckets: &[impl Copy + Into<u64>], q: f64) -> Option<f64> {
    let total: u64 = buckets.iter().map(|b| (*b).into()).sum();
    if total == 0 {
        return None;
    }
    let rank = (q * total as f64).ceil().max(1.0);
    let mut seen = 0u64;
    for (i, b) in buckets.iter().enumerate() {
        let n: u64 = (*b).into();
        if n == 0 {
            continue;
        }
        if (seen + n) as f64 >= rank {
            let Some(upper) = LATENCY_BUCKETS.get(i) else {
                return LATENCY_BUCKETS.last().copied();
            };
            let lower = if i == 0 { 0.0 } else { LATENCY_BUCKETS[i - 1] };
            let within = (rank - seen as f64) / n as f64;
            return Some(lower + (upper - lower) * within);
        }
        seen += n;
    }
    LATENCY_BUCKETS.last().copied()
}

/// The quantiles of upstream response times a slot of a ring shows.
const QUANTILES: [f64; 3] = [0.50, 0.95, 0.99];

/// Slots of a ring per chunk of its memory: a ring takes its memory a chunk at a time, when a
/// slot of the chunk is first written, and gives a chunk back once every slot in it is older
/// than the ring's span. An app that has had no traffic for a day keeps no slots; one with
/// traffic all day keeps them all ([`Requests::bytes_per_app`]).
const CHUNK: usize = 24;
const _: () = assert!(HOUR.slots.is_multiple_of(CHUNK) && DAY.slots.is_multiple_of(CHUNK));

/// The slot being counted, with its histogram of upstream response times.
///
/// Counts are u32, saturating: a slot of the day ring lasts 300 s, and 2^32 requests in it
/// would be 14 million a second through one Nginx, beyond what one machine serves.
#[derive(Debug, Clone, Copy, Default)]
struct Open {
    /// Which slot of time (unix seconds / slot length) this counts.
    index: u64,
    requests: u32,
    /// 5xx and upstream failures.
    errors: u32,
    latency: [u32; SLOTS],
}

/// A slot that is over: what plots and automatic rollback read of it. Nothing is added to a
/// slot once a later one has begun, so its quantiles are final when it closes and its histogram
/// is not kept. Quantiles are f32 (NaN without upstream times): they only place the points of
/// plots. 24 bytes against the open slot's 80.
#[derive(Debug, Clone, Copy)]
struct Closed {
    /// Which slot of time this holds; others are stale. u32: slot numbers of 10 s reach 2^32
    /// in the year 3331.
    index: u32,
    requests: u32,
    errors: u32,
    quantiles: [f32; QUANTILES.len()],
}

impl Closed {
    const EMPTY: Closed = Closed {
        index: 0,
        requests: 0,
        errors: 0,
        quantiles: [f32::NAN; QUANTILES.len()],
    };
}

/// The quantiles a closed slot keeps of its histogram.
fn closed_quantiles(latency: &[u32; SLOTS]) -> [f32; QUANTILES.len()] {
    QUANTILES.map(|q| quantile(latency, q).map_or(f32::NAN, |v| v as f32))
}

#[derive(Debug)]
struct Chunk {
    /// The newest slot index stored in `slots`.
    newest: u32,
    slots: [Closed; CHUNK],
}

/// What a ring holds of one slot of time.
struct SlotCounts {
    requests: u32,
    errors: u32,
    quantiles: [Option<f64>; QUANTILES.len()],
}

/// A ring of time slots: the open one, and the closed ones in chunks taken as needed.
#[derive(Debug)]
struct Ring {
    span: Span,
    open: Open,
    chunks: Box<[Option<Box<Chunk>>]>,
}

impl Ring {
    fn new(span: Span) -> Ring {
        Ring {
            span,
            open: Open::default(),
            chunks: (0..span.slots / CHUNK).map(|_| None).collect(),
        }
    }

    fn add(&mut self, now: u64, l: &Line) {
        let index = now / self.span.seconds;
        let n = self.span.slots as u64;
        if index < self.open.index && index + n > self.open.index {
            return self.add_late(index, l);
        }
        // A later slot, or an earlier one than the ring holds (the clock was set back by
        // more than the ring's span): counting starts again there.
        if index != self.open.index {
            self.close(index);
        }
        let slot = &mut self.open;
        slot.requests = slot.requests.saturating_add(1);
        if l.class().is_error() {
            slot.errors = slot.errors.saturating_add(1);
        }
        if let Some(s) = l.upstream_seconds() {
            let b = &mut slot.latency[bucket(s)];
            *b = b.saturating_add(1);
        }
    }

    /// Stores the open slot among the closed ones and opens slot `next`; gives back the chunks
    /// whose every slot is older than the ring as of `next`.
    fn close(&mut self, next: u64) {
        let open = std::mem::replace(
            &mut self.open,
            Open {
                index: next,
                ..Open::default()
            },
        );
        let n = self.span.slots as u64;
        for chunk in self.chunks.iter_mut() {
            if chunk
                .as_ref()
                .is_some_and(|c| u64::from(c.newest) + n <= next)
            {
                *chunk = None;
            }
        }
        // Nothing to keep, or older than the ring already (the app was quiet for a while).
        if open.requests == 0 || open.index + n <= next {
            return;
        }
        let at = (open.index % n) as usize;
        let chunk = self.chunk(at);
        let index = open.index as u32;
        chunk.newest = chunk.newest.max(index);
        chunk.slots[at % CHUNK] = Closed {
            index,
            requests: open.requests,
            errors: open.errors,
            quantiles: closed_quantiles(&open.latency),
        };
    }

    /// Counts a request in slot `index`, closed already (the clock was set back a little). It
    /// counts in the slot's requests and errors; its response time is in the slot's quantiles
    /// only when it is the slot's first request (the histogram of a closed slot is gone).
    fn add_late(&mut self, index: u64, l: &Line) {
        let n = self.span.slots as u64;
        let at = (index % n) as usize;
        let chunk = self.chunk(at);
        chunk.newest = chunk.newest.max(index as u32);
        let slot = &mut chunk.slots[at % CHUNK];
        if u64::from(slot.index) != index || slot.requests == 0 {
            let mut latency = [0u32; SLOTS];
            if let Some(s) = l.upstream_seconds() {
                latency[bucket(s)] = 1;
            }
            *slot = Closed {
                index: index as u32,
                requests: 0,
                errors: 0,
                quantiles: closed_quantiles(&latency),
            };
        }
        slot.requests = slot.requests.saturating_add(1);
        if l.class().is_error() {
            slot.errors = slot.errors.saturating_add(1);
        }
    }

    /// The chunk holding ring position `at`, taken if it was not.
    fn chunk(&mut self, at: usize) -> &mut Chunk {
        self.chunks[at / CHUNK].get_or_insert_with(|| {
            Box::new(Chunk {
                newest: 0,
                slots: [Closed::EMPTY; CHUNK],
            })
        })
    }

    /// The counts of slot `index`, if the ring holds it.
    fn get(&self, index: u64) -> Option<SlotCounts> {
        let o = &self.open;
        if o.index == index && o.requests > 0 {
            return Some(SlotCounts {
                requests: o.requests,
                errors: o.errors,
                quantiles: QUANTILES.map(|q| quantile(&o.latency, q)),
            });
        }
        let at = (index % self.span.slots as u64) as usize;
        let slot = &self.chunks[at / CHUNK].as_ref()?.slots[at % CHUNK];
        (u64::from(slot.index) == index && slot.requests > 0).then(|| SlotCounts {
            requests: slot.requests,
            errors: slot.errors,
            quantiles: slot
                .quantiles
                .map(|q| (!q.is_nan()).then_some(f64::from(q))),
        })
    }

    /// The ring's slots from oldest to newest, ending with the one holding `now`.
    fn points(&self, now: u64) -> Vec<Point> {
        let last = now / self.span.seconds;
        let n = self.span.slots as u64;
        let secs = self.span.seconds as f64;
        (last + 1 - n.min(last + 1)..=last)
            .map(|index| {
                let slot = self.get(index);
                let q = |i: usize| slot.as_ref().and_then(|s| s.quantiles[i]);
                Point {
                    start: index * self.span.seconds,
                    requests_per_second: slot.as_ref().map_or(0.0, |s| s.requests as f64 / secs),
                    errors_per_second: slot.as_ref().map_or(0.0, |s| s.errors as f64 / secs),
                    p50: q(0),
                    p95: q(1),
                    p99: q(2),
                }
            })
            .collect()
    }

    /// Bytes of memory the ring's chunks take when it has taken every one.
    fn most_bytes(span: Span) -> usize {
        span.slots / CHUNK * std::mem::size_of::<Chunk>()
    }
}

/// One slot of a series, for plots.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Point {
    /// Unix time (seconds) the slot starts.
    pub start: u64,
    pub requests_per_second: f64,
    pub errors_per_second: f64,
    /// Upstream response time quantiles (seconds) of the slot; `None` without any.
    pub p50: Option<f64>,
    pub p95: Option<f64>,
    pub p99: Option<f64>,
}

/// Everything counted of one app.
#[derive(Debug)]
struct AppTraffic {
    total: Counters,
    /// The newest releases, oldest first.
    releases: Vec<(u64, Counters)>,
    hour: Ring,
    day: Ring,
}

impl AppTraffic {
    fn new() -> AppTraffic {
        AppTraffic {
            total: Counters::default(),
            releases: Vec::with_capacity(KEPT_RELEASES + 1),
            hour: Ring::new(HOUR),
            day: Ring::new(DAY),
        }
    }

    fn add(&mut self, now: u64, l: &Line) {
        self.total.add(l);
        self.hour.add(now, l);
        self.day.add(now, l);
        match self.releases.iter().position(|(r, _)| *r >= l.release) {
            Some(i) if self.releases[i].0 == l.release => self.releases[i].1.add(l),
            // An older release than every kept one, with no room left: its old workers are
            // draining; the app's totals have it.
            Some(0) if self.releases.len() >= KEPT_RELEASES => {}
            at => {
                let mut c = Counters::default();
                c.add(l);
                self.releases
                    .insert(at.unwrap_or(self.releases.len()), (l.release, c));
                if self.releases.len() > KEPT_RELEASES {
                    self.releases.remove(0);
                }
            }
        }
    }
}

/// An app's name, totals, and kept releases (deploy number, counters) oldest first.
pub type AppCounters = (String, Counters, Vec<(u64, Counters)>);

/// Why a line was not counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    /// Not in keter's format (or from an earlier keter's format).
    Malformed,
    /// An app beyond [`MAX_APPS`].
    TooManyApps,
}

/// The request metrics of every app; the tailer alone adds to them.
#[derive(Debug, Default)]
pub struct Requests {
    apps: Mutex<BTreeMap<String, AppTraffic>>,
    /// Lines of the request log read.
    pub lines: AtomicU64,
    pub malformed: AtomicU64,
    pub too_many_apps: AtomicU64,
    /// Bytes of the request log not read: a backlog too large (`tailer::MAX_BACKLOG`).
    pub skipped_bytes: AtomicU64,
}

/// The counters of one app or release, for JSON.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CountersView {
    pub requests: u64,
    /// Requests by class: `1xx` to `5xx` as Nginx answered, and `upstream_failure` (a 502 or
    /// 504 of Nginx itself: the app could not be reached or did not answer in time).
    pub by_class: BTreeMap<&'static str, u64>,
    pub response_bytes: u64,
    /// Upstream response time quantiles (seconds), from the histogram; `None` without any.
    pub upstream_seconds_p50: Option<f64>,
    pub upstream_seconds_p95: Option<f64>,
    pub upstream_seconds_p99: Option<f64>,
}

impl From<&Counters> for CountersView {
    fn from(c: &Counters) -> CountersView {
        CountersView {
            requests: c.requests(),
            by_class: Class::ALL
                .iter()
                .map(|k| (k.as_str(), c.classes[*k as usize]))
                .collect(),
            response_bytes: c.bytes,
            upstream_seconds_p50: quantile(&c.latency, 0.50),
            upstream_seconds_p95: quantile(&c.latency, 0.95),
            upstream_seconds_p99: quantile(&c.latency, 0.99),
        }
    }
}

/// One release's counters, for JSON.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReleaseView {
    /// The deploy number (`deploy` in the app's report).
    pub release: u64,
    #[serde(flatten)]
    pub counters: CountersView,
}

/// What `/api/apps/NAME` shows as `requests`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    /// Since keter started.
    #[serde(flatten)]
    pub total: CountersView,
    /// Over the last minute.
    pub requests_per_second: f64,
    pub errors_per_second: f64,
    /// The kept releases, newest first.
    pub releases: Vec<ReleaseView>,
}

/// Requests and, of them, 5xx and upstream failures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Errors {
    pub requests: u64,
    pub errors: u64,
}

impl Errors {
    /// The share of failed requests (0 without requests).
    pub fn ratio(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.errors as f64 / self.requests as f64
        }
    }
}

/// A release's failed requests since its switch, and the app's over as long before it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ErrorsBeside {
    pub release: Errors,
    pub before: Errors,
}

/// Unix time in seconds.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Counts `l` among `apps` at unix time `now`.
fn add_to(apps: &mut BTreeMap<String, AppTraffic>, now: u64, l: &Line) -> Result<(), Dropped> {
    if let Some(t) = apps.get_mut(l.app) {
        t.add(now, l);
        return Ok(());
    }
    if apps.len() >= MAX_APPS {
        return Err(Dropped::TooManyApps);
    }
    let mut t = AppTraffic::new();
    t.add(now, l);
    apps.insert(l.app.to_string(), t);
    Ok(())
}

impl Requests {
    /// Counts one request at unix time `now`.
    pub fn add(&self, now: u64, l: &Line) -> Result<(), Dropped> {
        let mut apps = self.apps.lock().unwrap_or_else(|e| e.into_inner());
        add_to(&mut apps, now, l)
    }

    /// Counts the lines of Nginx's request log in `lines`, each ending in a newline (what
    /// follows the last newline is not read), each at the time Nginx logged it or at `now` if
    /// that is later (a clock stepped back since); a line that is not keter's is counted as
    /// malformed. One lock for them all: the status pages wait at most one read of the log.
    pub fn count_lines(&self, lines: &[u8], now: u64) {
        let mut last = LastTime::default();
        let (mut read, mut malformed, mut too_many) = (0u64, 0u64, 0u64);
        let mut apps = self.apps.lock().unwrap_or_else(|e| e.into_inner());
        let mut from = 0;
        for end in memchr::memchr_iter(b'\n', lines) {
            read += 1;
            match Line::parse_after(&lines[from..end], &mut last) {
                Some(l) => {
                    if add_to(&mut apps, l.time.min(now), &l).is_err() {
                        too_many += 1;
                    }
                }
                None => malformed += 1,
            }
            from = end + 1;
        }
        drop(apps);
        self.lines.fetch_add(read, Ordering::Relaxed);
        self.malformed.fetch_add(malformed, Ordering::Relaxed);
        self.too_many_apps.fetch_add(too_many, Ordering::Relaxed);
    }

    /// Counts a line that was not counted.
    pub fn dropped(&self, why: Dropped) {
        match why {
            Dropped::Malformed => &self.malformed,
            Dropped::TooManyApps => &self.too_many_apps,
        }
        .fetch_add(1, Ordering::Relaxed);
    }

    /// Every app's totals and kept releases (oldest first), by name.
    pub fn counters(&self) -> Vec<AppCounters> {
        let apps = self.apps.lock().unwrap_or_else(|e| e.into_inner());
        apps.iter()
            .map(|(name, t)| (name.clone(), t.total.clone(), t.releases.clone()))
            .collect()
    }

    /// The JSON summary of `app` at unix time `now`; `None` before its first request.
    pub fn summary(&self, app: &str, now: u64) -> Option<Summary> {
        let apps = self.apps.lock().unwrap_or_else(|e| e.into_inner());
        let t = apps.get(app)?;
        // The last minute: six full 10 s slots before the current one.
        let points = t.hour.points(now);
        let minute = &points[points.len().saturating_sub(7)..points.len().saturating_sub(1)];
        let per_second = |f: fn(&Point) -> f64| {
            (minute.iter().map(f).sum::<f64>() / minute.len().max(1) as f64 * 1000.0).round()
                / 1000.0
        };
        Some(Summary {
            total: (&t.total).into(),
            requests_per_second: per_second(|p| p.requests_per_second),
            errors_per_second: per_second(|p| p.errors_per_second),
            releases: t
                .releases
                .iter()
                .rev()
                .map(|(r, c)| ReleaseView {
                    release: *r,
                    counters: c.into(),
                })
                .collect(),
        })
    }

    /// The slots of `app` over `span` (`HOUR` or `DAY`) up to `now`, oldest first; `None`
    /// before its first request.
    pub fn series(&self, app: &str, span: Span, now: u64) -> Option<Vec<Point>> {
        let apps = self.apps.lock().unwrap_or_else(|e| e.into_inner());
        let t = apps.get(app)?;
        Some(if span == DAY {
            t.day.points(now)
        } else {
            t.hour.points(now)
        })
    }

    /// The failed requests (5xx and upstream failures) of release `release` (a deploy number)
    /// of `app`, switched to at unix time `switched`, beside the app's over as long before the
    /// switch as `now` is after it (whole 10 s slots of the last hour, ending before the slot
    /// of the switch: what the predecessor served). Automatic rollback asks for it (README
    /// "Releases and rollback"); `None` before the app's first request. Reads at most the
    /// hour's 360 slots.
    pub fn errors_since_switch(
        &self,
        app: &str,
        release: u64,
        switched: u64,
        now: u64,
    ) -> Option<ErrorsBeside> {
        let apps = self.apps.lock().unwrap_or_else(|e| e.into_inner());
        let t = apps.get(app)?;
        let errors = |c: &Counters| {
            Class::ALL
                .iter()
                .filter(|k| k.is_error())
                .map(|k| c.classes[*k as usize])
                .sum()
        };
        let after = t
            .releases
            .iter()
            .find(|(r, _)| *r == release)
            .map(|(_, c)| Errors {
                requests: c.requests(),
                errors: errors(c),
            })
            .unwrap_or_default();
        let secs = HOUR.seconds;
        let end = switched / secs;
        let slots = now
            .saturating_sub(switched)
            .div_ceil(secs)
            .clamp(1, HOUR.slots as u64 - 1);
        let mut before = Errors::default();
        for slot in (end.saturating_sub(slots)..end).filter_map(|index| t.hour.get(index)) {
            before.requests += u64::from(slot.requests);
            before.errors += u64::from(slot.errors);
        }
        Some(ErrorsBeside {
            release: after,
            before,
        })
    }

    /// Bytes of memory one app's metrics take at most, once it has had traffic in every slot
    /// of the last day (the bench reports it); an app's first request takes
    /// [`Requests::bytes_per_new_app`].
    pub fn bytes_per_app() -> usize {
        Self::bytes_per_new_app() + Ring::most_bytes(HOUR) + Ring::most_bytes(DAY)
    }

    /// Bytes of memory an app's metrics take before any of its rings' slots has closed.
    pub fn bytes_per_new_app() -> usize {
        std::mem::size_of::<AppTraffic>()
            + (KEPT_RELEASES + 1) * std::mem::size_of::<(u64, Counters)>()
            + (HOUR.slots + DAY.slots) / CHUNK * std::mem::size_of::<Option<Box<Chunk>>>()
    }
}

#[cfg(test)]
mod tests;
