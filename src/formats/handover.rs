//! What an in-place upgrade passes from one image of keter to the next (`src/handover.rs`):
//! the handover file, and the answer of the new binary to `keter --check-handover`, which the
//! running keter reads before it hands anything over.

use std::os::fd::RawFd;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{Mono, ReadError, Reads};

/// The format of the handover file this build writes.
pub const FORMAT: u32 = 1;
/// The formats of the handover file this build reads.
pub const READS: Reads = Reads {
    oldest: 1,
    newest: FORMAT,
};

/// The formats that every keter before the format ranges wrote, records and handover alike.
/// Such a keter asks nothing more than whether the new binary's `handover` and `records` equal
/// its own, so a binary that reads these formats answers with them (see [`Answer`]).
pub const RANGELESS: u32 = 1;

/// Reads a handover file of any format in [`READS`].
pub fn read(bytes: &[u8]) -> Result<Handed, ReadError> {
    let value: serde_json::Value = serde_json::from_slice(bytes)?;
    super::format_of(&value, READS)?;
    // Once FORMAT is raised, an older format is read here into its own types and converted.
    Ok(serde_json::from_value(value)?)
}

/// The handover file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handed {
    pub format: u32,
    /// The keter that handed over: its version and build.
    pub from: String,
    /// When the upgrade began (the signal).
    pub since: Mono,
    pub pipes: Vec<HandedPipe>,
}

/// An app's output pipe, left open across the exec, and the start of a line read from it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandedPipe {
    pub ino: u64,
    pub fd: RawFd,
    pub partial: Vec<u8>,
}

/// What `keter --check-handover` prints: what the binary reads and where it would run.
///
/// `handover` and `records` are what a keter that predates the ranges compares with the
/// formats it writes ([`RANGELESS`]): they are those formats when this binary reads them, and
/// else the formats this binary writes (so that such a keter refuses). A keter that knows the
/// ranges reads `reads_handover` and `reads_records`; a binary that predates them answers
/// without, and reads only its own `handover` and `records`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answer {
    pub keter: String,
    pub handover: u32,
    pub records: u32,
    pub root: PathBuf,
    pub nginx_mode: String,
    #[serde(default)]
    pub reads_handover: Option<Reads>,
    #[serde(default)]
    pub reads_records: Option<Reads>,
}

impl Answer {
    /// The handover formats the binary that answered reads.
    pub fn reads_handover(&self) -> Reads {
        self.reads_handover.unwrap_or(Reads::only(self.handover))
    }

    /// The record formats the binary that answered reads.
    pub fn reads_records(&self) -> Reads {
        self.reads_records.unwrap_or(Reads::only(self.records))
    }
}

/// This build's answer, for a keter with `root` and `nginx_mode`.
pub fn answer(root: PathBuf, nginx_mode: &str) -> Answer {
    let legacy = |reads: Reads, writes: u32| {
        if reads.contains(RANGELESS) {
            RANGELESS
        } else {
            writes
        }
    };
    Answer {
        keter: crate::build::VERSION.to_string(),
        handover: legacy(READS, FORMAT),
        records: legacy(super::records::READS, super::records::FORMAT),
        root,
        nginx_mode: nginx_mode.to_string(),
        reads_handover: Some(READS),
        reads_records: Some(super::records::READS),
    }
}
