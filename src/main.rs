//! The `keter` command: parses the command line and calls into the library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use keter::config::{self, Config};
use keter::daemon::{self, Control, Input};

const HELP: &str = "\
keter: deploys web application bundles behind Nginx, with zero-downtime redeploys.

Usage:
  keter CONFIG            run the daemon in the foreground (CONFIG: keter-config.yaml or a root folder)
  keter run [CONFIG]      the same; CONFIG defaults to /etc/keter/keter-config.yaml
  keter check PATH        validate a global config, a bundle (NAME.keter) or a bundle folder;
                          prints every problem with its file and key, exits 1 if any
  keter --version         print the version
  keter --help            print this help

Deploy an app by copying NAME.keter into ROOT/incoming/; copy a new version over it to
redeploy; delete it to stop the app. SIGHUP rescans incoming/, SIGTERM or SIGINT stops
every app and exits. RUST_LOG sets the log level (default info).

Examples:
  keter /opt/keter/etc/keter-config.yaml
  keter check myapp.keter
  cp myapp.keter /opt/keter/incoming/
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let words: Vec<&str> = args.iter().map(String::as_str).collect();
    match words.as_slice() {
        [] | ["--help"] | ["-h"] | ["help"] => {
            print!("{HELP}");
            if words.is_empty() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            }
        }
        ["--version"] | ["-V"] => {
            println!("keter {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        ["run"] => run_daemon(Path::new(config::DEFAULT_CONFIG_PATH)),
        ["run", path] => run_daemon(Path::new(path)),
        ["check", path] => check(Path::new(path)),
        [path] if !path.starts_with('-') && !is_command(path) => run_daemon(Path::new(path)),
        _ => {
            eprintln!(
                "keter: unrecognised arguments: {}\n\n{HELP}",
                args.join(" ")
            );
            ExitCode::from(2)
        }
    }
}

fn is_command(word: &str) -> bool {
    matches!(word, "run" | "check")
}

fn init_logging() {
    let mut builder =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    builder.format_target(false);
    // At debug level the PostgreSQL client logs every statement it sends, and CREATE ROLE
    // carries the role's SCRAM verifier (issue 5: no credential material in logs).
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

fn check(path: &Path) -> ExitCode {
    let (errors, warnings) = if path.is_dir() && path.join("config").is_dir() {
        check_bundle_dir(path, &path.display().to_string())
    } else if path.extension().is_some_and(|e| e == "keter") {
        check_bundle_file(path)
    } else {
        let (_, problems) = Config::check(path);
        (
            problems.errors.iter().map(|p| p.to_string()).collect(),
            problems.warnings.iter().map(|p| p.to_string()).collect(),
        )
    };
    for w in &warnings {
        println!("warning: {w}");
    }
    for e in &errors {
        println!("error: {e}");
    }
    if errors.is_empty() {
        println!("{}: OK", path.display());
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn check_bundle_dir(dir: &Path, label: &str) -> (Vec<String>, Vec<String>) {
    match keter::bundle::read_config(dir, label) {
        Ok((_, problems)) => (
            Vec::new(),
            problems.warnings.iter().map(|p| p.to_string()).collect(),
        ),
        Err(invalid) => (
            invalid.0.iter().map(|p| p.to_string()).collect(),
            Vec::new(),
        ),
    }
}

fn check_bundle_file(path: &Path) -> (Vec<String>, Vec<String>) {
    let label = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut errors = Vec::new();
    if let Some(Err(why)) = keter::names::AppName::from_bundle_file_name(&label) {
        errors.push(format!("{label}: {why}"));
    }
    let dest: PathBuf = std::env::temp_dir().join(format!("keter-check-{}", std::process::id()));
    let limits = config::BundleLimits::default();
    match keter::bundle::unpack(path, &dest, &limits) {
        Ok(u) => {
            let (mut e, w) = check_bundle_dir(&u.dir, &label);
            errors.append(&mut e);
            let _ = std::fs::remove_dir_all(&dest);
            (errors, w)
        }
        Err(e) => {
            errors.push(format!("{label}: {e}"));
            (errors, Vec::new())
        }
    }
}
