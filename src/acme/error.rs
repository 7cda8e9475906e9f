//! Why an attempt to obtain a certificate failed, sorted into the few kinds an operator acts
//! on differently: the CA cannot be reached (wait, check the network), a challenge failed (fix
//! DNS or the front end), the CA's rate limit (wait longer), anything else (read the message).

use std::fmt;
use std::time::SystemTime;

use serde::Serialize;

/// The kind of a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorKind {
    /// No answer from the CA: connection refused or timed out, TLS failure, a 5xx answer.
    CaUnreachable,
    /// The CA could not validate a host: it did not reach keter's Nginx, or got the wrong
    /// answer at `/.well-known/acme-challenge/`.
    ChallengeFailed,
    /// The CA's rate limit (`rateLimited`, HTTP 429).
    RateLimited,
    /// Anything else: the CA refused the request or a name, a local file could not be
    /// written, the certificate received was not usable.
    Other,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::CaUnreachable => "ca-unreachable",
            ErrorKind::ChallengeFailed => "challenge-failed",
            ErrorKind::RateLimited => "rate-limited",
            ErrorKind::Other => "other",
        }
    }
}

/// A failed attempt: its kind, a message for the log and the status page, and when the CA
/// asked to be contacted again (`Retry-After`), if it did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcmeError {
    pub kind: ErrorKind,
    pub message: String,
    pub retry_after: Option<SystemTime>,
}

impl AcmeError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> AcmeError {
        AcmeError {
            kind,
            message: message.into(),
            retry_after: None,
        }
    }

    /// Classifies an error of the ACME client library. `what` says which step failed.
    pub fn from_client(what: &str, e: &instant_acme::Error) -> AcmeError {
        use instant_acme::Error as E;
        let (kind, detail) = match e {
            E::Api(problem) => (problem_kind(problem), problem.to_string()),
            E::Timeout(_) => (
                ErrorKind::Other,
                "the CA did not finish in time".to_string(),
            ),
            E::Other(inner) => match inner.downcast_ref::<Unreachable>() {
                Some(u) => (ErrorKind::CaUnreachable, u.0.clone()),
                None => (ErrorKind::CaUnreachable, chain(inner.as_ref())),
            },
            E::Hyper(inner) => (ErrorKind::CaUnreachable, chain(inner)),
            E::Json(inner) => (
                ErrorKind::Other,
                format!("the CA's answer is not what RFC 8555 says: {inner}"),
            ),
            other => (ErrorKind::Other, other.to_string()),
        };
        AcmeError::new(kind, format!("{what}: {detail}"))
    }

    /// For a step that validates nothing (account, order, finalization), where a problem such
    /// as `unauthorized` is about the account, not about a challenge.
    pub fn outside_challenge(mut self) -> AcmeError {
        if self.kind == ErrorKind::ChallengeFailed {
            self.kind = ErrorKind::Other;
        }
        self
    }
}

impl fmt::Display for AcmeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind.as_str(), self.message)
    }
}

impl std::error::Error for AcmeError {}

/// The HTTP client's own verdict that the CA did not answer usefully (refused connection,
/// timeout, TLS failure, a 5xx page that is not an ACME problem document). It travels through
/// the ACME library as its `Error::Other`.
#[derive(Debug)]
pub struct Unreachable(pub String);

impl fmt::Display for Unreachable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unreachable {}

/// The kind of an RFC 8555 problem document (section 6.7).
pub fn problem_kind(problem: &instant_acme::Problem) -> ErrorKind {
    let kind = |t: &str| -> Option<ErrorKind> {
        let name = t.strip_prefix("urn:ietf:params:acme:error:")?;
        Some(match name {
            "rateLimited" => ErrorKind::RateLimited,
            "connection" | "dns" | "incorrectResponse" | "unauthorized" | "tls" | "caa" => {
                ErrorKind::ChallengeFailed
            }
            "serverInternal" => ErrorKind::CaUnreachable,
            _ => ErrorKind::Other,
        })
    };
    if let Some(k) = problem.r#type.as_deref().and_then(kind) {
        // A compound problem carries the reason in its subproblems.
        if k != ErrorKind::Other || problem.subproblems.is_empty() {
            return k;
        }
    }
    if let Some(k) = problem
        .subproblems
        .iter()
        .filter_map(|s| s.r#type.as_deref().and_then(kind))
        .find(|k| *k != ErrorKind::Other)
    {
        return k;
    }
    match problem.status {
        Some(429) => ErrorKind::RateLimited,
        Some(s) if s >= 500 => ErrorKind::CaUnreachable,
        _ => ErrorKind::Other,
    }
}

/// An error and its sources on one line (hyper's top-level message alone says little:
/// "client error (Connect): tcp connect error: Connection refused (os error 111)").
pub(super) fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(json: &str) -> instant_acme::Problem {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn problem_documents_are_classified() {
        let cases = [
            (
                r#"{"type": "urn:ietf:params:acme:error:rateLimited", "detail": "too many certificates", "status": 429}"#,
                ErrorKind::RateLimited,
            ),
            (
                r#"{"type": "urn:ietf:params:acme:error:incorrectResponse", "status": 403}"#,
                ErrorKind::ChallengeFailed,
            ),
            (
                r#"{"type": "urn:ietf:params:acme:error:connection"}"#,
                ErrorKind::ChallengeFailed,
            ),
            (
                r#"{"type": "urn:ietf:params:acme:error:serverInternal", "status": 500}"#,
                ErrorKind::CaUnreachable,
            ),
            (
                r#"{"type": "urn:ietf:params:acme:error:rejectedIdentifier", "status": 400}"#,
                ErrorKind::Other,
            ),
            (
                r#"{"type": "urn:ietf:params:acme:error:compound", "subproblems": [{"type": "urn:ietf:params:acme:error:dns", "detail": "NXDOMAIN"}]}"#,
                ErrorKind::ChallengeFailed,
            ),
            (
                r#"{"detail": "slow down", "status": 429}"#,
                ErrorKind::RateLimited,
            ),
            (r#"{"status": 503}"#, ErrorKind::CaUnreachable),
        ];
        for (json, kind) in cases {
            assert_eq!(problem_kind(&problem(json)), kind, "{json}");
        }
    }

    #[test]
    fn client_errors_name_the_step_and_keep_the_reason() {
        let e = AcmeError::from_client(
            "new order",
            &instant_acme::Error::Api(problem(
                r#"{"type": "urn:ietf:params:acme:error:rateLimited", "detail": "too many certificates"}"#,
            )),
        );
        assert_eq!(e.kind, ErrorKind::RateLimited);
        assert!(e.message.starts_with("new order: "), "{}", e.message);
        assert!(e.message.contains("too many certificates"), "{}", e.message);
        let e = AcmeError::from_client(
            "directory",
            &instant_acme::Error::Other(Box::new(Unreachable(
                "https://127.0.0.1:9/dir: connection refused".into(),
            ))),
        );
        assert_eq!(e.kind, ErrorKind::CaUnreachable);
        assert_eq!(
            e.to_string(),
            "ca-unreachable: directory: https://127.0.0.1:9/dir: connection refused"
        );
    }
}
