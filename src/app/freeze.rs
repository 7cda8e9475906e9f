//! The worker's part of an in-place upgrade (`src/handover.rs`): it comes to rest so that its
//! record says everything a new keter needs. A switch in flight is waited for (Nginx's files
//! must be what the record says); an unpack or a readiness check is dropped, its candidate
//! stopped, and the deploy held to be started again (by this keter if the upgrade does not
//! happen, by the new one from `incoming/` if it does). Commands that arrive meanwhile are
//! held the same way; nothing new starts while frozen.

use super::Command;
use super::Effects;
use super::machine::{End, Life, Machine, Stage};

impl Machine {
    /// Starts coming to rest for a handover.
    pub fn freeze(&mut self, fx: &mut dyn Effects) {
        self.frozen = true;
        self.stop_superseded(fx);
        let held = match &mut self.life {
            // A switch in flight is waited for.
            Life::Deploying { deploy, .. } if matches!(deploy.stage, Stage::Switching(_)) => None,
            Life::Deploying { deploy, .. } => {
                let command = deploy.pending.take().unwrap_or_else(|| Command::Deploy {
                    path: deploy.path.clone(),
                    retry: true,
                });
                if matches!(deploy.stage, Stage::Unpacking) {
                    // Its result, when it comes, matches no deploy and is discarded.
                    self.life.turn(|life| (back_to(life), ()));
                } else {
                    self.fail_candidate(
                        End::Stopped(
                            "keter is being upgraded; the bundle is deployed again after it",
                        ),
                        fx,
                    );
                }
                Some(command)
            }
            // A stop waiting for an unpack: the stop is held (a shutdown goes on: the worker
            // ends once the unpack is back).
            Life::Stopping {
                deploy,
                exit: false,
                ..
            } if matches!(deploy.stage, Stage::Unpacking) => {
                self.life.turn(|life| (back_to(life), ()));
                Some(Command::Stop)
            }
            _ => None,
        };
        if held.is_some() {
            self.held = held;
        }
    }

    /// True once nothing is in flight that the record could not say: after [`freeze`], a
    /// switch, a stop, a refresh of the site, and the stages that stop versions and exited
    /// processes' groups (their threads would not survive the upgrade's exec).
    ///
    /// [`freeze`]: Machine::freeze
    pub fn quiet(&self) -> bool {
        !matches!(
            self.life,
            Life::Deploying { .. } | Life::Stopping { .. } | Life::Leaving { .. }
        ) && self.discarding.is_empty()
            && self.reaping.is_empty()
            && self.refreshing.is_none()
    }

    /// A command while frozen: the newest is held.
    pub(super) fn hold(&mut self, command: Command) {
        self.commands += 1;
        self.held = Some(command);
    }

    /// The upgrade did not happen: carries on, with the command held, then the events that
    /// arrived while resting after a snapshot, in order.
    pub fn thaw(&mut self, fx: &mut dyn Effects) {
        self.frozen = false;
        let later = self.resting.take().unwrap_or_default();
        if let Some(c) = self.held.take() {
            self.command(c, fx);
        }
        if !later.is_empty() {
            self.step(later, fx);
        }
    }
}

/// The life before a deploy whose unpack is dropped: what served serves on.
fn back_to(life: Life) -> Life {
    match life {
        Life::Deploying { serving, .. } | Life::Stopping { serving, .. } => match serving {
            Some(v) => Life::Serving(v),
            None => Life::Idle(super::machine::Why::New),
        },
        other => other,
    }
}
