//! The `keter` command: parses the command line and calls into the library.

use std::collections::HashMap;
use std::path::Path;
use std::process::ExitCode;

use keter::cli::{self, Command};
use keter::config::{self, Config};
use keter::daemon::{self, Control, Input};
use keter::handover::{self, Takeover};

fn main() -> ExitCode {
    // Before any thread starts: the command line an upgrade executes again, and what an
    // earlier image of this process handed over (`src/handover.rs`).
    handover::remember_invocation();
    let takeover = handover::take();
    let lock = keter::rootlock::inherited();
    let stored = keter::systemd::stored_pipes();
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some(handover::CHECK) {
        return check_handover(&args[1..]);
    }
    if args.first().map(String::as_str) == Some(keter::cgroup::RELEASE) {
        return release_cgroup();
    }
    match cli::parse(&args) {
        Ok(Command::Run(path)) => run_daemon(&path, takeover, stored, lock),
        Ok(command) => cli::run(command),
        Err(usage) => {
            eprintln!("keter: {}\n\n{}", usage.message, usage.help);
            ExitCode::from(2)
        }
    }
}

/// `keter --check-handover ARGS...`: asked by a running keter before it re-executes this
/// binary, whether it can take over with the command line ARGS (`src/handover.rs`). Prints
/// what it reads and where it would run, as JSON.
fn check_handover(args: &[String]) -> ExitCode {
    let path = match cli::parse(args) {
        Ok(Command::Run(path)) => path,
        _ => {
            eprintln!(
                "keter: {}: not a command line that runs the daemon",
                handover::CHECK
            );
            return ExitCode::from(2);
        }
    };
    match Config::load(&path) {
        Ok(config) => {
            let answer = handover::answer(&config);
            println!("{}", serde_json::to_string(&answer).unwrap_or_default());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!(
                "keter: invalid configuration: {}",
                config::describe(&e.0).replace('\n', "; ")
            );
            ExitCode::from(1)
        }
    }
}

/// `keter --release-cgroup`: the `ExecStopPost=` of keter's systemd unit, which hands the
/// controllers below the unit's cgroup back up so that systemd can start keter there again
/// (`src/cgroup.rs`, `debian/keter.service`).
fn release_cgroup() -> ExitCode {
    match keter::cgroup::release_own() {
        Ok(done) => {
            println!("keter: {done}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("keter: {}: {e}", keter::cgroup::RELEASE);
            ExitCode::from(1)
        }
    }
}

fn run_daemon(
    path: &Path,
    takeover: Option<Result<Takeover, handover::TakeError>>,
    stored: HashMap<u64, std::fs::File>,
    lock: Option<std::fs::File>,
) -> ExitCode {
    // Before any thread starts (it reads and removes a variable of the environment).
    let open_files = keter::process::raise_open_files();
    keter::logging::init();
    if let Some((from, to)) = open_files {
        log::info!("keter: limit of open files raised from {from} to {to}");
    }
    // A panic on any thread ends keter at once: without the thread (an app's worker, say) the
    // rest would go on half-working. Started again (by systemd's Restart=), keter takes every
    // app over from its records, so a panic costs no request and restarts no app.
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        log::error!("keter: {info}; stopping at once, a keter started again takes the apps over");
        std::process::abort();
    }));
    // The handlers first: a signal that came before them would end keter (after an upgrade,
    // the new image has the default dispositions until here).
    let (tx, rx) = daemon::channel();
    if let Err(e) = forward_signals(tx.clone()) {
        log::error!("cannot install signal handlers: {e}");
        return ExitCode::from(1);
    }
    handover::unblock_signals();
    let takeover = match takeover {
        Some(Ok(t)) => {
            log::info!(
                "keter: taking over from keter {} (in-place upgrade)",
                t.from
            );
            Some(t)
        }
        Some(Err(e)) => {
            log::error!("keter: {e}; taking the apps over from their records instead");
            None
        }
        None => None,
    };
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            log::error!("invalid configuration:\n{}", config::describe(&e.0));
            return ExitCode::from(1);
        }
    };
    match daemon::run(config, tx, rx, takeover, stored, lock) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("keter cannot run: {e}");
            ExitCode::from(1)
        }
    }
}

/// SIGTERM and SIGINT stop the daemon; SIGHUP rescans `incoming/`; SIGUSR2 upgrades keter in
/// place.
fn forward_signals(tx: crossbeam_channel::Sender<Input>) -> std::io::Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR2};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP, SIGUSR2])?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                let control = if sig == SIGHUP {
                    log::info!("keter: SIGHUP, rescanning incoming/");
                    Control::Rescan
                } else if sig == SIGUSR2 {
                    Control::Upgrade
                } else {
                    log::info!("keter: signal {sig}, shutting down");
                    Control::Shutdown
                };
                let _ = tx.send(Input::Control(control));
            }
        })?;
    Ok(())
}
