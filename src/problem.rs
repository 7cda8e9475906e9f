//! A problem found in a configuration or bundle file, named by file and key.
//!
//! Validation never stops at the first problem: every reader collects `Problem`s so that
//! `keter check` and the daemon's log can show all of them at once.

use std::fmt;

/// One thing wrong (or suspicious) in a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The file the problem is in, as the user would name it (`hello.keter: config/keter.yaml`).
    pub file: String,
    /// Dotted key path inside the file (`stanzas[0].exec`); empty for file-level problems.
    pub key: String,
    /// What is wrong and, where it helps, what was expected.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.file, self.message)
        } else {
            write!(f, "{}: {}: {}", self.file, self.key, self.message)
        }
    }
}

/// Problems collected while reading one file: errors make the file unusable, warnings do not.
#[derive(Debug, Default, Clone)]
pub struct Problems {
    /// Name used for every problem recorded here.
    pub file: String,
    pub errors: Vec<Problem>,
    pub warnings: Vec<Problem>,
}

impl Problems {
    pub fn new(file: impl Into<String>) -> Problems {
        Problems {
            file: file.into(),
            ..Problems::default()
        }
    }

    /// Records an error at `key`; `message` is a text or an error value, shown as it
    /// displays.
    pub fn error(&mut self, key: impl Into<String>, message: impl fmt::Display) {
        self.errors.push(Problem {
            file: self.file.clone(),
            key: key.into(),
            message: message.to_string(),
        });
    }

    pub fn warn(&mut self, key: impl Into<String>, message: impl fmt::Display) {
        self.warnings.push(Problem {
            file: self.file.clone(),
            key: key.into(),
            message: message.to_string(),
        });
    }

    pub fn has_errors(&self) -> bool {
        !self.errors.is_empty()
    }
}

/// The errors of a file that could not be used, as one error value.
#[derive(Debug, Clone)]
pub struct Invalid(pub Vec<Problem>);

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Invalid {}
