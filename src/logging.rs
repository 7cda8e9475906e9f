//! keter's own log on stderr (journald's under systemd): `env_logger`'s lines, each message
//! made printable first.
//!
//! What apps print is made printable where it becomes a line (`src/applog.rs`); keter's
//! messages also quote what others wrote (a bundle's paths and values, an app's HTTP answer
//! in a readiness failure), and a control character there would reach the operator's
//! terminal, or a NUL end a journal record early. So every message goes through
//! [`crate::applog::printable`] here as well (it changes nothing in text that is printable
//! already), and a newline inside a message starts an indented line: no line of keter's log
//! can then begin with what journald reads as a priority (`<3>`).

use std::borrow::Cow;

use log::{Log, Metadata, Record};

/// Starts keter's log: `RUST_LOG` sets the level (default `info`), without timestamps of its
/// own under systemd (journald adds them).
pub fn init() {
    let mut builder =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    builder.format_target(false);
    // At debug level the PostgreSQL client logs every statement it sends, and CREATE ROLE
    // carries the role's SCRAM verifier (no credential material in logs).
    builder.filter_module("tokio_postgres", log::LevelFilter::Info);
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        builder.format_timestamp(None);
    } else {
        builder.format_timestamp_millis();
    }
    let inner = builder.build();
    let level = inner.filter();
    if log::set_boxed_logger(Box::new(Printable(inner))).is_ok() {
        log::set_max_level(level);
    }
}

/// `env_logger` with every message made printable.
struct Printable(env_logger::Logger);

impl Log for Printable {
    fn enabled(&self, metadata: &Metadata) -> bool {
        self.0.enabled(metadata)
    }

    fn log(&self, record: &Record) {
        if !self.0.matches(record) {
            return;
        }
        let text = record.args().to_string();
        let text = message(&text);
        self.0.log(
            &Record::builder()
                .args(format_args!("{text}"))
                .metadata(record.metadata().clone())
                .module_path(record.module_path())
                .file(record.file())
                .line(record.line())
                .build(),
        );
    }

    fn flush(&self) {
        self.0.flush()
    }
}

/// One message of keter's: each of its lines printable, the lines after the first indented.
pub fn message(text: &str) -> Cow<'_, str> {
    if !text.contains('\n') {
        return crate::applog::printable(text);
    }
    let lines: Vec<Cow<str>> = text.split('\n').map(crate::applog::printable).collect();
    Cow::Owned(lines.join("\n  "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_printable_and_no_line_starts_a_record_of_its_own() {
        assert!(matches!(message("app: ready"), Cow::Borrowed(_)));
        assert_eq!(
            message("exec ../a\n<3>forged\0 \x1b[2J is not in the bundle"),
            "exec ../a\n  <3>forged\\x00 \\x1b[2J is not in the bundle"
        );
    }
}
