//! The `keter` command: parses the command line and calls into the library.

use std::path::Path;
use std::process::ExitCode;

use keter::cli::{self, Command};
use keter::config::{self, Config};
use keter::daemon::{self, Control, Input};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match cli::parse(&args) {
        Ok(Command::Run(path)) => run_daemon(&path),
        Ok(command) => cli::run(command),
        Err(usage) => {
            eprintln!("keter: {}\n\n{}", usage.message, usage.help);
            ExitCode::from(2)
        }
    }
}

fn init_logging() {
    let mut builder =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    builder.format_target(false);
    // At debug level the PostgreSQL client logs every statement it sends, and CREATE ROLE
    // carries the role's SCRAM verifier (no credential material in logs).
    builder.filter_module("tokio_postgres", log::LevelFilter::Info);
    // journald adds its own timestamps.
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        builder.format_timestamp(None);
    } else {
        builder.format_timestamp_millis();
    }
    builder.init();
}

fn run_daemon(path: &Path) -> ExitCode {
    init_logging();
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            log::error!("invalid configuration:\n{}", config::describe(&e.0));
            return ExitCode::from(1);
        }
    };
    let (tx, rx) = daemon::channel();
    if let Err(e) = forward_signals(tx.clone()) {
        log::error!("cannot install signal handlers: {e}");
        return ExitCode::from(1);
    }
    match daemon::run(config, tx, rx) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("keter cannot run: {e}");
            ExitCode::from(1)
        }
    }
}

/// SIGTERM and SIGINT stop the daemon; SIGHUP rescans `incoming/`.
fn forward_signals(tx: crossbeam_channel::Sender<Input>) -> std::io::Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                let control = if sig == SIGHUP {
                    log::info!("keter: SIGHUP, rescanning incoming/");
                    Control::Rescan
                } else {
                    log::info!("keter: signal {sig}, shutting down");
                    Control::Shutdown
                };
                let _ = tx.send(Input::Control(control));
            }
        })?;
    Ok(())
}
