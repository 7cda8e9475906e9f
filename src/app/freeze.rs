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
        let held = match std::mem::replace(&mut self.life, Life::Ended) {
            Life::Deploying {
                serving,
                mut deploy,
            } => match deploy.stage {
                Stage::Unpacking => {
                    // Its result, when it comes, matches no deploy and is discarded.
                    self.life = back_to(serving);
                    Some(deploy.pending.take().unwrap_or(Command::Deploy {
                        path: deploy.path,
                        retry: true,
                    }))
                }
                Stage::Readiness(_) => {
                    let command = deploy.pending.take().unwrap_or(Command::Deploy {
                        path: deploy.path.clone(),
                        retry: true,
                    });
                    self.life = Life::Deploying { serving, deploy };
                    self.fail_candidate(
                        End::Stopped(
                            "keter is being upgraded; the bundle is deployed again after it",
                        ),
                        fx,
                    );
                    Some(command)
                }
                Stage::Switching(_) => {
                    self.life = Life::Deploying { serving, deploy };
                    None
                }
            },
            // A stop waiting for an unpack: the stop is held (a shutdown goes on: the worker
            // ends once the unpack is back).
            Life::Stopping {
                serving,
                deploy,
                exit: false,
            } if matches!(deploy.stage, Stage::Unpacking) => {
                self.life = back_to(serving);
                Some(Command::Stop)
            }
            other => {
                self.life = other;
                None
            }
        };
        if held.is_some() {
            self.held = held;
        }
    }

    /// True once nothing is in flight that the record could not say: after [`freeze`], a
    /// switch, a stop, and the stages that stop versions and exited processes' groups (their
    /// threads would not survive the upgrade's exec).
    ///
    /// [`freeze`]: Machine::freeze
    pub fn quiet(&self) -> bool {
        !matches!(
            self.life,
            Life::Deploying { .. } | Life::Stopping { .. } | Life::Leaving { .. }
        ) && self.discarding.is_empty()
            && self.reaping.is_empty()
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

fn back_to(serving: Option<Box<super::version::Version>>) -> Life {
    match serving {
        Some(v) => Life::Serving(v),
        None => Life::Idle(super::machine::Why::New),
    }
}
