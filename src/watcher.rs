//! Watching `incoming/`: inotify events become hints for the daemon, which then looks at the
//! folder itself. A bundle is acted on when it is closed after writing or renamed in (never on
//! creation, so a half-copied file is not picked up: Keter #66, #318); on a lost-event
//! overflow the whole folder is rescanned.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crossbeam_channel::{Sender, TrySendError};
use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
use notify::{RecommendedWatcher, RecursiveMode, Watcher as _};

/// What the watcher tells the daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hint {
    /// Something happened to this file name in `incoming/`.
    Changed(String),
    /// A name was created: acted on only for a symlink (which is refused), since a regular
    /// file that was just created is still being written.
    Created(String),
    /// Events were lost: look at the whole folder.
    Rescan,
}

/// Keeps the inotify watch alive; dropping it stops watching.
pub struct IncomingWatcher {
    _watcher: RecommendedWatcher,
    /// Set when a hint could not be queued; the daemon rescans when it sees it.
    pub overflowed: Arc<AtomicBool>,
}

/// Starts watching `dir`. Hints go to `tx` with `try_send` (the callback never blocks); a hint
/// that does not fit sets `overflowed`.
pub fn watch<T: From<Hint> + Send + 'static>(
    dir: &Path,
    tx: Sender<T>,
) -> notify::Result<IncomingWatcher> {
    let overflowed = Arc::new(AtomicBool::new(false));
    let flag = overflowed.clone();
    let send = move |hint: Hint| match tx.try_send(T::from(hint)) {
        Ok(()) | Err(TrySendError::Disconnected(_)) => {}
        Err(TrySendError::Full(_)) => flag.store(true, Ordering::Relaxed),
    };
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        let event = match res {
            Ok(e) => e,
            Err(e) => {
                log::warn!("watching incoming/: {e}; rescanning");
                send(Hint::Rescan);
                return;
            }
        };
        if event.need_rescan() {
            send(Hint::Rescan);
            return;
        }
        let hint: fn(String) -> Hint = match event.kind {
            EventKind::Access(AccessKind::Close(AccessMode::Write))
            | EventKind::Modify(ModifyKind::Name(_))
            | EventKind::Remove(_) => Hint::Changed,
            EventKind::Create(_) => Hint::Created,
            _ => return,
        };
        for path in &event.paths {
            if let Some(name) = file_name(path) {
                send(hint(name));
            }
        }
    })?;
    watcher.watch(dir, RecursiveMode::NonRecursive)?;
    Ok(IncomingWatcher {
        _watcher: watcher,
        overflowed,
    })
}

fn file_name(path: &Path) -> Option<String> {
    path.file_name().map(|n| n.to_string_lossy().into_owned())
}
