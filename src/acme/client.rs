//! One attempt to obtain a certificate over ACME's HTTP-01 challenge, with the `instant-acme`
//! client: the account (created once per CA and stored), a new order for the host set, the
//! challenge answers in keter's webroot, finalization with a fresh P-256 key, the chain, and
//! the checked file. Every failure becomes an [`AcmeError`] of one kind.
//!
//! This is async code: it runs only on the ACME thread's own single-threaded runtime
//! (`manager.rs`), never on the status server's and never beside blocking work.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, RETRY_AFTER};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, BodyWrapper, BytesResponse, ChallengeType,
    HttpClient, Identifier, NewAccount, NewOrder, Order, OrderStatus, RetryPolicy,
};

use super::certificate::Certificate;
use super::challenge::Challenges;
use super::config::AcmeConfig;
use super::error::{AcmeError, ErrorKind, Unreachable, chain, problem_kind};
use super::hosts::HostSet;
use super::store::{Store, StoredAccount};

/// The longest wait for one answer of the CA.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest wait for a TCP connection to the CA.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the CA may take to validate the challenges, and then to issue.
const VALIDATION: RetryPolicy = RetryPolicy::new()
    .initial_delay(Duration::from_millis(250))
    .backoff(1.5)
    .timeout(Duration::from_secs(90));

/// What an attempt needs: the CA, and where keter's files go.
pub struct Ca {
    config: AcmeConfig,
    store: Store,
    webroot: PathBuf,
}

impl Ca {
    /// Checks that an HTTP client for the CA can be made (the roots load).
    pub fn new(config: AcmeConfig, store: Store, webroot: PathBuf) -> Result<Ca, TlsSetupError> {
        CaHttp::new(&config)?;
        Ok(Ca {
            config,
            store,
            webroot,
        })
    }

    /// Obtains and stores a certificate for `hosts`. Each attempt has an HTTP client of its
    /// own: a connection kept from an earlier attempt may have been closed by the CA since,
    /// and would fail the first request of this one.
    pub async fn obtain(&self, hosts: &HostSet) -> Result<Certificate, AcmeError> {
        let http = CaHttp::new(&self.config).map_err(other)?;
        let result = self.attempt(hosts, &http).await;
        result.map_err(|mut e| {
            if e.retry_after.is_none() {
                e.retry_after = http.retry_after();
            }
            e
        })
    }

    async fn attempt(&self, hosts: &HostSet, http: &CaHttp) -> Result<Certificate, AcmeError> {
        let account = self.account(http).await?;
        let identifiers: Vec<Identifier> = hosts
            .hosts()
            .iter()
            .map(|h| Identifier::Dns(h.to_string()))
            .collect();
        let mut order = match account.new_order(&NewOrder::new(&identifiers)).await {
            Ok(order) => order,
            Err(e) => {
                let mut error = AcmeError::from_client("new order", &e).outside_challenge();
                if is_unknown_account(&e) {
                    // The CA lost or closed keter's account: the next attempt opens another.
                    let set_aside = self
                        .store
                        .set_account_aside(&self.config.directory)
                        .map_err(other)?;
                    error.message.push_str(&format!(
                        "; the account file is kept as {}, and the next attempt opens a new account",
                        set_aside.display()
                    ));
                }
                return Err(error);
            }
        };
        // The answers stay in the webroot until the order is decided, and go in any case.
        let mut challenges = Challenges::new(&self.webroot).map_err(other)?;
        let mut authorizations = order.authorizations();
        while let Some(authz) = authorizations.next().await {
            let mut authz = authz.map_err(|e| AcmeError::from_client("authorization", &e))?;
            let host = authz.identifier().to_string();
            match authz.status {
                AuthorizationStatus::Pending => {}
                AuthorizationStatus::Valid => continue,
                status => {
                    return Err(AcmeError::new(
                        ErrorKind::ChallengeFailed,
                        format!("{host}: the CA's authorization is {status:?}"),
                    ));
                }
            }
            let Some(mut challenge) = authz.challenge(ChallengeType::Http01) else {
                return Err(AcmeError::new(
                    ErrorKind::Other,
                    format!("{host}: the CA offers no http-01 challenge"),
                ));
            };
            challenges
                .write(&challenge.token, challenge.key_authorization().as_str())
                .map_err(other)?;
            challenge
                .set_ready()
                .await
                .map_err(|e| AcmeError::from_client(&format!("{host}: challenge"), &e))?;
        }
        let (status, problem) = match order.poll_ready(&VALIDATION).await {
            Ok(s) => (s, None),
            // The order's own problem is vaguer than its challenges': look at those first.
            Err(instant_acme::Error::Api(p)) => (OrderStatus::Invalid, Some(p)),
            Err(e) => return Err(AcmeError::from_client("validation", &e)),
        };
        if status != OrderStatus::Ready {
            return Err(why_invalid(&mut order, status, problem).await);
        }
        drop(challenges);
        let key_pem = order
            .finalize()
            .await
            .map_err(|e| AcmeError::from_client("finalize", &e).outside_challenge())?;
        let chain_pem = order
            .poll_certificate(&VALIDATION)
            .await
            .map_err(|e| AcmeError::from_client("certificate", &e).outside_challenge())?;
        self.store
            .save_certificate(hosts, &key_pem, &chain_pem, SystemTime::now())
            .map_err(other)
    }

    /// keter's account at this CA: the stored one, or a new one (stored before it is used).
    async fn account(&self, http: &CaHttp) -> Result<Account, AcmeError> {
        let directory = self.config.directory.clone();
        let contact: Vec<String> = self
            .config
            .email
            .iter()
            .map(|e| format!("mailto:{e}"))
            .collect();
        let contact: Vec<&str> = contact.iter().map(String::as_str).collect();
        if let Some(mut stored) = self.store.load_account(&directory).map_err(other)? {
            let credentials: AccountCredentials =
                serde_json::from_value(stored.credentials.clone()).map_err(|e| {
                    other(format!(
                        "{}: not an account file keter wrote: {e}",
                        self.store.account_path(&directory).display()
                    ))
                })?;
            let account = Account::builder_with_http(Box::new(http.clone()))
                .from_credentials(credentials)
                .await
                .map_err(|e| AcmeError::from_client("directory", &e).outside_challenge())?;
            if stored.email != self.config.email {
                account.update_contacts(&contact).await.map_err(|e| {
                    AcmeError::from_client("account contact", &e).outside_challenge()
                })?;
                stored.email = self.config.email.clone();
                self.store.save_account(&stored).map_err(other)?;
            }
            return Ok(account);
        }
        let (account, credentials) = Account::builder_with_http(Box::new(http.clone()))
            .create(
                &NewAccount {
                    contact: &contact,
                    terms_of_service_agreed: true,
                    only_return_existing: false,
                },
                directory.clone(),
                None,
            )
            .await
            .map_err(|e| AcmeError::from_client("new account", &e).outside_challenge())?;
        let credentials = serde_json::to_value(&credentials)
            .map_err(|e| other(format!("cannot encode the account: {e}")))?;
        self.store
            .save_account(&StoredAccount {
                directory,
                email: self.config.email.clone(),
                credentials,
            })
            .map_err(other)?;
        log::info!(
            "acme: account created at {} ({})",
            self.config.directory,
            self.store.account_path(&self.config.directory).display()
        );
        Ok(account)
    }
}

/// The reason an order became invalid: the first failed challenge's problem, with its host;
/// else the order's own `problem`.
async fn why_invalid(
    order: &mut Order,
    status: OrderStatus,
    problem: Option<instant_acme::Problem>,
) -> AcmeError {
    let mut authorizations = order.authorizations();
    while let Some(authz) = authorizations.next().await {
        let Ok(mut authz) = authz else { continue };
        let host = authz.identifier().to_string();
        let Ok(state) = authz.refresh().await else {
            continue;
        };
        if state.status == AuthorizationStatus::Valid {
            continue;
        }
        if let Some(problem) = state.challenges.iter().find_map(|c| c.error.as_ref()) {
            let kind = match problem_kind(problem) {
                ErrorKind::Other => ErrorKind::ChallengeFailed,
                k => k,
            };
            return AcmeError::new(
                kind,
                format!("{host}: {}", problem.detail.as_deref().unwrap_or("invalid")),
            );
        }
        return AcmeError::new(
            ErrorKind::ChallengeFailed,
            format!("{host}: the CA's authorization is {:?}", state.status),
        );
    }
    if let Some(p) = problem {
        return AcmeError::from_client("validation", &instant_acme::Error::Api(p));
    }
    AcmeError::new(
        ErrorKind::ChallengeFailed,
        format!("the order is {status:?} after validation"),
    )
}

/// Whether the CA does not know the account that signed the request (RFC 8555 7.3.1).
fn is_unknown_account(e: &instant_acme::Error) -> bool {
    matches!(e, instant_acme::Error::Api(p)
        if p.r#type.as_deref() == Some("urn:ietf:params:acme:error:accountDoesNotExist"))
}

/// A failure of keter's own (a file, a certificate it cannot use), as it reads.
fn other(e: impl std::fmt::Display) -> AcmeError {
    AcmeError::new(ErrorKind::Other, e.to_string())
}

/// The HTTP client for the CA: rustls (ring) with the system's roots or the `ca-file`'s,
/// timeouts on connecting and on each answer, and the CA's `Retry-After` remembered. A 5xx
/// answer that is not an ACME problem document (a proxy's error page) and any transport
/// failure become [`Unreachable`].
/// Why no HTTPS client for the CA can be made.
#[derive(Debug)]
pub enum TlsSetupError {
    /// The system's trusted certificates cannot be loaded.
    SystemRoots(std::io::Error),
    /// A certificate of `ca-file` cannot be a root.
    Root {
        ca_file: Option<PathBuf>,
        source: rustls::Error,
    },
    /// No protocol version is left to use.
    Protocols(rustls::Error),
}

impl std::fmt::Display for TlsSetupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TlsSetupError::SystemRoots(e) => {
                write!(f, "cannot load the system's trusted certificates: {e}")
            }
            TlsSetupError::Root { ca_file, source } => write!(
                f,
                "{}: a certificate cannot be used as a root: {source}",
                ca_file
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            ),
            TlsSetupError::Protocols(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for TlsSetupError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            TlsSetupError::SystemRoots(e) => Some(e),
            TlsSetupError::Root { source: e, .. } | TlsSetupError::Protocols(e) => Some(e),
        }
    }
}

#[derive(Clone)]
struct CaHttp {
    client: HyperClient<hyper_rustls::HttpsConnector<HttpConnector>, BodyWrapper<Bytes>>,
    retry_after: Arc<Mutex<Option<SystemTime>>>,
}

impl CaHttp {
    fn new(config: &AcmeConfig) -> Result<CaHttp, TlsSetupError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = hyper_rustls::HttpsConnectorBuilder::new();
        let builder = if config.ca_roots.is_empty() {
            builder
                .with_provider_and_platform_verifier(provider)
                .map_err(TlsSetupError::SystemRoots)?
        } else {
            let mut roots = rustls::RootCertStore::empty();
            for cert in &config.ca_roots {
                roots
                    .add(cert.clone())
                    .map_err(|source| TlsSetupError::Root {
                        ca_file: config.ca_file.clone(),
                        source,
                    })?;
            }
            let tls = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(TlsSetupError::Protocols)?
                .with_root_certificates(roots)
                .with_no_client_auth();
            builder.with_tls_config(tls)
        };
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(CONNECT_TIMEOUT));
        let connector = builder.https_only().enable_http1().wrap_connector(http);
        Ok(CaHttp {
            client: HyperClient::builder(TokioExecutor::new()).build(connector),
            retry_after: Arc::new(Mutex::new(None)),
        })
    }

    fn retry_after(&self) -> Option<SystemTime> {
        *self.retry_after.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl HttpClient for CaHttp {
    fn request(
        &self,
        req: http::Request<BodyWrapper<Bytes>>,
    ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, instant_acme::Error>> + Send>> {
        let uri = req.uri().to_string();
        let fut = self.client.request(req);
        let retry_after = self.retry_after.clone();
        Box::pin(async move {
            let unreachable = |why: String| {
                instant_acme::Error::Other(Box::new(Unreachable(format!("{uri}: {why}"))))
            };
            let rsp = match tokio::time::timeout(REQUEST_TIMEOUT, fut).await {
                Err(_) => {
                    return Err(unreachable(format!(
                        "no answer within {} s",
                        REQUEST_TIMEOUT.as_secs()
                    )));
                }
                Ok(Err(e)) => return Err(unreachable(chain(&e))),
                Ok(Ok(rsp)) => rsp,
            };
            let status = rsp.status();
            if (status.as_u16() == 429 || status.as_u16() == 503)
                && let Some(t) = rsp
                    .headers()
                    .get(RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(parse_retry_after)
            {
                *retry_after.lock().unwrap_or_else(|e| e.into_inner()) = Some(t);
            }
            let problem = rsp
                .headers()
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.starts_with("application/problem+json"));
            if status.is_server_error() && !problem {
                return Err(unreachable(format!("the CA answered {status}")));
            }
            Ok(BytesResponse::from(rsp))
        })
    }
}

/// `Retry-After` as seconds (HTTP dates are rare from CAs; they count as absent).
fn parse_retry_after(v: &str) -> Option<SystemTime> {
    let secs: u64 = v.trim().parse().ok()?;
    Some(SystemTime::now() + Duration::from_secs(secs.min(30 * 86_400)))
}
