//! Everything keter writes for another keter to read: the app records
//! (`ROOT/etc/state/NAME.json`, [`records`]), the handover file of an in-place upgrade and the
//! answer to the question a running keter asks the new binary before it ([`handover`]). The
//! types here are plain data; the runtime types convert to and from them (`src/app/record.rs`,
//! `src/app/adopt.rs`, `src/handover.rs`), so that no change of a runtime type changes what
//! is on disk by accident.
//!
//! Each file carries its format number. A build writes the newest format it knows and reads
//! every format from the first one on: a newer keter takes over from any older one, and an
//! older keter that cannot read what a newer one wrote is never handed the apps (README,
//! "Upgrading keter in place").
//!
//! The formats are pinned by the files in `tests/fixtures/formats/`: each format's files as the
//! build that introduced it wrote them, read by every later build, and a sample that the
//! current build must write exactly (`src/formats/tests.rs`).
//!
//! # History
//!
//! | records | handover | first written by | what changed |
//! |---|---|---|---|
//! | 1 | 1 | keter 0.1.0 | the first formats (their files: a run of the build of commit `cd230ab`) |
//! | 2 | 1 | keter 0.1.0 | a deploy's result may be `stopped` (a stop, keter's shutdown or an upgrade interrupted it); format 1 reads as it is |
//!
//! Two files that keter keeps for a later keter have their own format outside this module:
//! `ROOT/releases/NAME/releases.json` (`src/app/releases.rs`, its `FORMAT`, read when not
//! newer) and `ROOT/etc/maintenance/NAME.json` (`src/app/maintenance.rs`); their samples
//! `sample-releases-1.json` and `sample-maintenance-1.json` pin them the same way.
//!
//! A change to a type here that an older keter could not read, or that writes something
//! different, is a new format: raise [`records::FORMAT`] or [`handover::FORMAT`], add a row
//! above, read the previous format in `records::read` / `handover::read` (converting it), and
//! commit the new golden file. A new field that an older file lacks takes `#[serde(default)]`.

pub mod handover;
pub mod records;
#[cfg(test)]
mod tests;

use std::fmt;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// The formats of one kind of file that a build reads: from `oldest` to `newest`, each
/// included.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reads {
    pub oldest: u32,
    pub newest: u32,
}

impl Reads {
    /// Just `format`: what a keter that predates the ranges reads (its own format only).
    pub const fn only(format: u32) -> Reads {
        Reads {
            oldest: format,
            newest: format,
        }
    }

    pub fn contains(self, format: u32) -> bool {
        (self.oldest..=self.newest).contains(&format)
    }
}

impl fmt::Display for Reads {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.oldest == self.newest {
            write!(f, "{}", self.oldest)
        } else {
            write!(f, "{} to {}", self.oldest, self.newest)
        }
    }
}

/// Why a persisted file does not read.
#[derive(Debug)]
pub enum ReadError {
    /// Not JSON, or not the shape its format has.
    Malformed(serde_json::Error),
    /// No format number.
    NoFormat,
    /// A format this build does not read (written by a newer keter, or not a keter's).
    Unsupported { format: u64, reads: Reads },
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadError::Malformed(e) => write!(f, "{e}"),
            ReadError::NoFormat => write!(f, "it has no \"format\" number"),
            ReadError::Unsupported { format, reads } => write!(
                f,
                "it has format {format}, and keter {} reads formats {reads}",
                crate::build::VERSION
            ),
        }
    }
}

impl std::error::Error for ReadError {}

impl From<serde_json::Error> for ReadError {
    fn from(e: serde_json::Error) -> ReadError {
        ReadError::Malformed(e)
    }
}

/// The format number of a file read as JSON, checked against the formats read.
fn format_of(value: &serde_json::Value, reads: Reads) -> Result<u32, ReadError> {
    let format = value
        .get("format")
        .and_then(serde_json::Value::as_u64)
        .ok_or(ReadError::NoFormat)?;
    match u32::try_from(format) {
        Ok(f) if reads.contains(f) => Ok(f),
        _ => Err(ReadError::Unsupported { format, reads }),
    }
}

/// A moment on the monotonic clock (`CLOCK_MONOTONIC`, nanoseconds), the clock of `Instant`,
/// which every process of one boot shares: an `Instant` means nothing to another process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Mono(pub u64);

impl Mono {
    pub fn of(t: Instant) -> Mono {
        let (i0, m0) = anchor();
        match t.checked_duration_since(i0) {
            Some(after) => Mono(m0.saturating_add(after.as_nanos() as u64)),
            None => Mono(m0.saturating_sub((i0 - t).as_nanos() as u64)),
        }
    }

    pub fn instant(self) -> Instant {
        let (i0, m0) = anchor();
        if self.0 >= m0 {
            i0 + Duration::from_nanos(self.0 - m0)
        } else {
            i0.checked_sub(Duration::from_nanos(m0 - self.0))
                .unwrap_or(i0)
        }
    }
}

/// An `Instant` and the monotonic clock read together once, to convert between them.
fn anchor() -> (Instant, u64) {
    static ANCHOR: OnceLock<(Instant, u64)> = OnceLock::new();
    *ANCHOR.get_or_init(|| {
        // CLOCK_MONOTONIC cannot fail; 0 if it did, as before.
        let mono = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |ts| {
            ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
        });
        (Instant::now(), mono)
    })
}
