//! Keter's `unknown-host-response-file`, `missing-host-response-file` and
//! `proxy-exception-response-file`: pages Nginx answers with instead of its built-in ones, with
//! Keter's status codes (404 for a host no app serves, 502 for a request without a host name
//! and for an app that cannot be reached).
//!
//! The files are read when the configuration is loaded, as Keter reads them at start; one that
//! cannot be read is a warning and the built-in page is used, as in Keter since 2.1.3. keter
//! copies them into `ROOT/nginx/worker-files/responses/` for Nginx's workers.

use std::path::Path;

use crate::config::normalize;
use crate::problem::Problems;
use crate::yaml::Fields;

/// The bodies of the three pages, when the operator gave them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResponseFiles {
    /// `unknown-host-response-file`: 404 for a host no app serves (managed mode, whose default
    /// server is keter's).
    pub unknown_host: Option<Vec<u8>>,
    /// `missing-host-response-file`: 502, as Keter answers, for a request without `Host`
    /// (managed mode).
    pub missing_host: Option<Vec<u8>>,
    /// `proxy-exception-response-file`: 502 when Nginx cannot reach an app or a reversed
    /// server, or it does not answer within the time bound.
    pub proxy_exception: Option<Vec<u8>>,
}

/// Each page's file name under `worker-files/responses/`, and its key.
pub const PAGES: [(&str, &str); 3] = [
    ("unknown-host.html", "unknown-host-response-file"),
    ("missing-host.html", "missing-host-response-file"),
    ("proxy-exception.html", "proxy-exception-response-file"),
];

impl ResponseFiles {
    /// The pages given, by file name.
    pub fn pages(&self) -> Vec<(&'static str, &[u8])> {
        [
            &self.unknown_host,
            &self.missing_host,
            &self.proxy_exception,
        ]
        .into_iter()
        .zip(PAGES)
        .filter_map(|(body, (name, _))| body.as_deref().map(|b| (name, b)))
        .collect()
    }
}

/// Larger pages are refused: they are error pages.
const MAX_PAGE: u64 = 1 << 20;

/// Reads the three keys; relative paths are taken from the configuration file's folder (Keter
/// took them from its working directory). `system` warns about the pages that the host's
/// default server answers in system mode.
pub fn read(f: &mut Fields, base: &Path, system: bool, problems: &mut Problems) -> ResponseFiles {
    let mut out = ResponseFiles::default();
    for (i, (_, key)) in PAGES.iter().enumerate() {
        let Some(file) = f.string(key, problems) else {
            continue;
        };
        let path = normalize(&base.join(&file));
        let body = match std::fs::metadata(&path) {
            Ok(m) if m.is_file() && m.len() <= MAX_PAGE => match std::fs::read(&path) {
                Ok(b) => Some(b),
                Err(e) => {
                    problems.warn(
                        *key,
                        format!(
                            "cannot read {}: {e}; the built-in page is used",
                            path.display()
                        ),
                    );
                    None
                }
            },
            Ok(m) if m.is_file() => {
                problems.warn(
                    *key,
                    format!(
                        "{} is larger than 1 MiB; the built-in page is used",
                        path.display()
                    ),
                );
                None
            }
            Ok(_) => {
                problems.warn(
                    *key,
                    format!(
                        "{} is not a regular file; the built-in page is used",
                        path.display()
                    ),
                );
                None
            }
            Err(e) => {
                problems.warn(
                    *key,
                    format!(
                        "cannot read {}: {e}; the built-in page is used",
                        path.display()
                    ),
                );
                None
            }
        };
        if system && i < 2 && body.is_some() {
            problems.warn(
                *key,
                "in system mode the host's default server answers this request, not keter: the page is used only in managed mode",
            );
        }
        match i {
            0 => out.unknown_host = body,
            1 => out.missing_host = body,
            _ => out.proxy_exception = body,
        }
    }
    out
}
