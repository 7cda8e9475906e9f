//! The PostgreSQL plugin (README, "PostgreSQL plugin"): each app that asks for it gets its own role
//! and database on the server of the global `postgres` section, and the variables to reach
//! them.
//!
//! Keter's plugin piped string-built SQL into `sudo -u postgres psql` and stored 10-letter
//! passwords from a non-cryptographic generator. Here the admin role needs only CREATEROLE and
//! CREATEDB; names are derived from the app name and validated ([`Identifier`]) before they are
//! quoted into SQL; passwords come from the OS generator and reach the server only as SCRAM
//! hashes; credentials are recorded in `ROOT/etc/postgres.yaml` (Keter's format, mode 0600)
//! only once the database they name exists.
//!
//! Every step is idempotent so that the next deploy finishes whatever a failed or interrupted
//! one left behind (a role without its database, a database without its record).
//!
//! keter sends a credential only to a listener it has checked ([`listener`]: for a server on
//! this machine, the listener must belong to root or the server's user), and answers only
//! SCRAM-SHA-256 ([`session`]). Apps are given the server's socket folder where their role can
//! log in there, so that their own drivers, which check nothing, do not go through a TCP port
//! that any local process may take while the server restarts.
//!
//! The session runs its own tokio runtime: call [`Provisioner::provision`] from a plain thread
//! (an app worker), never from an async task.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::names::AppName;

mod for_apps;
pub mod listener;
mod session;
mod store;

use listener::{OpenError, Route, Trust};
use session::{Login, Session, StartError};
pub use store::{StoreError, StoredEntry};

/// How long keter waits for the server to accept a connection before the deploy fails.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Random bytes in an app password: 160 bits, above the minimum of 128.
const PASSWORD_BYTES: usize = 20;

/// A value that must never be printed: `Debug` and `Display` show a placeholder.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Secret {
        Secret(value)
    }

    /// The secret itself, for the few places that must hand it on (the server, the app).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// Where the server listens: a host name or IP address, or an absolute socket folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    /// A validated host name, an IP address, or an absolute path of a socket folder.
    host: String,
    pub port: u16,
}

impl Server {
    /// Validates `host`: an absolute socket folder (no control characters or white space), an
    /// IP address, or a host name by RFC 1123 label rules.
    pub fn new(host: &str, port: u16) -> Result<Server, PgNameError> {
        if host.starts_with('/') {
            if let Some(c) = host.chars().find(|c| c.is_control() || c.is_whitespace()) {
                return Err(PgNameError::SocketFolder(host.to_string(), c));
            }
        } else if host.parse::<IpAddr>().is_err() {
            let name = crate::names::Hostname::new(host).map_err(PgNameError::Host)?;
            if name.is_wildcard() {
                return Err(PgNameError::Wildcard(host.to_string()));
            }
        }
        if port == 0 {
            return Err(PgNameError::PortZero);
        }
        Ok(Server {
            host: host.to_string(),
            port,
        })
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn is_socket(&self) -> bool {
        self.host.starts_with('/')
    }

    /// The server part of a `postgresql://` URL and what follows the database: `@HOST:PORT`
    /// (IPv6 addresses in brackets) and nothing; or, for a socket folder, `@` and
    /// `?host=FOLDER&port=PORT` (README, "PostgreSQL plugin": every driver keter knows reads
    /// this form, where a percent-encoded folder as the host is lost on some).
    fn url_parts(&self) -> (String, String) {
        if self.is_socket() {
            let folder: String = self
                .host
                .split('/')
                .map(percent_encode)
                .collect::<Vec<_>>()
                .join("/");
            ("@".into(), format!("?host={folder}&port={}", self.port))
        } else if self.host.contains(':') {
            (format!("@[{}]:{}", self.host, self.port), String::new())
        } else {
            (format!("@{}:{}", self.host, self.port), String::new())
        }
    }
}

impl fmt::Display for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_socket() {
            write!(f, "socket folder {} port {}", self.host, self.port)
        } else if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// The admin connection of the global `postgres` section. The role needs CREATEROLE and
/// CREATEDB, not superuser.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresAdmin {
    pub server: Server,
    pub user: String,
    /// Read from `password-file` at load time; `None` for trust or peer authentication.
    pub password: Option<Secret>,
    /// The database the admin connects to (it creates the others from there).
    pub database: String,
    /// The user the server runs as (a name or a uid): a local listener of anyone else but
    /// root is refused (`postgres.server-user`, default `postgres`).
    pub server_user: String,
}

/// A role or database name keter may put into SQL: `[a-z_][a-z0-9_]*`, at most 63 bytes
/// (PostgreSQL's NAMEDATALEN - 1), not starting with the reserved `pg_`. Quoted anyway.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Identifier(String);

/// Why a server address or a PostgreSQL name is refused; each variant keeps the text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PgNameError {
    /// A socket folder with a control or white space character.
    SocketFolder(String, char),
    /// A host that is not a host name.
    Host(crate::names::NameError),
    /// A wildcard host name.
    Wildcard(String),
    PortZero,
    /// Not `[a-z_][a-z0-9_]*`.
    Identifier(String),
    /// Longer than [`Identifier::MAX_LEN`].
    TooLong(String),
    /// Starts with `pg_`.
    Reserved(String),
}

impl fmt::Display for PgNameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PgNameError::SocketFolder(host, c) => {
                write!(f, "the socket folder {host:?} contains {c:?}")
            }
            PgNameError::Host(e) => write!(f, "{e}"),
            PgNameError::Wildcard(host) => write!(f, "{host:?} is a wildcard, not a server"),
            PgNameError::PortZero => f.write_str("port 0 cannot be connected to"),
            PgNameError::Identifier(name) => write!(
                f,
                "{name:?} is not a PostgreSQL name keter uses ([a-z_][a-z0-9_]*)"
            ),
            PgNameError::TooLong(name) => {
                write!(f, "{name:?} is longer than {} bytes", Identifier::MAX_LEN)
            }
            PgNameError::Reserved(name) => {
                write!(f, "{name:?} starts with the reserved prefix pg_")
            }
        }
    }
}

impl std::error::Error for PgNameError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            PgNameError::Host(e) => Some(e),
            _ => None,
        }
    }
}

impl Identifier {
    pub const MAX_LEN: usize = 63;

    pub fn new(name: &str) -> Result<Identifier, PgNameError> {
        let mut chars = name.chars();
        let first_ok = chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_');
        let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !first_ok || !rest_ok {
            return Err(PgNameError::Identifier(name.to_string()));
        }
        if name.len() > Self::MAX_LEN {
            return Err(PgNameError::TooLong(name.to_string()));
        }
        if name.starts_with("pg_") {
            return Err(PgNameError::Reserved(name.to_string()));
        }
        Ok(Identifier(name.to_string()))
    }

    /// The role and database name of an app (see [`derive_identifier`]).
    pub fn for_app(app: &AppName) -> Identifier {
        Identifier(derive_identifier(app.as_str()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name as an SQL identifier: always quoted, although no valid name needs it.
    fn quoted(&self) -> String {
        format!("\"{}\"", self.0)
    }
}

impl fmt::Display for Identifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Derives a role and database name from any app name. An app name that already is a valid
/// identifier is used as it is. Any other is lower-cased, every character outside
/// `[a-z0-9_]` becomes `_`, a leading digit or `pg_` gets a `_` in front, it is cut to 54 bytes
/// and `_` plus 8 hex digits of the SHA-256 of the exact app name are appended: `My-App` and
/// `my_app` (or two 100-byte names that share their first 63 bytes) stay distinct.
pub fn derive_identifier(app: &str) -> String {
    let mut name: String = app
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) || name.starts_with("pg_")
    {
        name.insert(0, '_');
    }
    if name == app && name.len() <= Identifier::MAX_LEN {
        return name;
    }
    let digest = Sha256::digest(app.as_bytes());
    let suffix: String = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
    // Every character is ASCII here, so any byte index is a character boundary.
    name.truncate(Identifier::MAX_LEN - 1 - suffix.len());
    format!("{name}_{suffix}")
}

/// What an app needs to reach its database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub server: Server,
    pub database: Identifier,
    pub role: Identifier,
    pub password: Secret,
}

impl Credentials {
    /// The plugin's variables (README, "PostgreSQL plugin"): libpq's names, Keter's `PGPASS`, and a URL
    /// with the user and password percent-encoded.
    pub fn env(&self) -> BTreeMap<String, String> {
        let (server, query) = self.server.url_parts();
        let url = format!(
            "postgresql://{}:{}{server}/{}{query}",
            percent_encode(self.role.as_str()),
            percent_encode(self.password.expose()),
            percent_encode(self.database.as_str())
        );
        BTreeMap::from([
            ("PGHOST".into(), self.server.host.clone()),
            ("PGPORT".into(), self.server.port.to_string()),
            ("PGUSER".into(), self.role.to_string()),
            ("PGPASS".into(), self.password.expose().to_string()),
            ("PGPASSWORD".into(), self.password.expose().to_string()),
            ("PGDATABASE".into(), self.database.to_string()),
            ("DATABASE_URL".into(), url),
        ])
    }
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
pub fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Why an app's database could not be provided. Messages never contain a password.
#[derive(Debug)]
pub enum PgError {
    /// The server could not be reached or refused the admin's login.
    Connect { server: String, message: String },
    /// What answers at the server's address is not trusted with a credential (a listener of
    /// another user, a socket folder others may write, a request for the password in clear
    /// text): nothing was sent. `message` says who holds the listener.
    Untrusted { server: String, message: String },
    /// A statement failed; `step` says which.
    Sql { step: String, message: String },
    /// A name is taken by something keter did not create for this app.
    Conflict(String),
    /// The credentials file could not be read or written.
    Store(StoreError),
    /// The OS random generator failed.
    Random(String),
}

impl fmt::Display for PgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PgError::Connect { server, message } => {
                write!(f, "cannot connect to PostgreSQL at {server}: {message}")
            }
            PgError::Untrusted { server, message } => {
                write!(
                    f,
                    "keter does not log in to PostgreSQL at {server}: {message}"
                )
            }
            PgError::Sql { step, message } => write!(f, "{step} failed: {message}"),
            PgError::Conflict(m) => f.write_str(m),
            PgError::Store(e) => write!(f, "{e}"),
            PgError::Random(m) => write!(f, "cannot generate a password: {m}"),
        }
    }
}

impl std::error::Error for PgError {}

impl From<StoreError> for PgError {
    fn from(e: StoreError) -> PgError {
        PgError::Store(e)
    }
}

/// The server's own words for a failed statement (the client's `Display` says only
/// "db error" for some).
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.severity(), db.message()),
        None => e.to_string(),
    }
}

/// Creates and finds app databases; shared by all app workers.
pub struct Provisioner {
    admin: PostgresAdmin,
    /// `ROOT/etc/postgres.yaml`.
    store: PathBuf,
    /// Held while the credentials file is read and rewritten, so that two apps provisioned at
    /// once do not lose each other's record. Not held while talking to the server.
    store_lock: Mutex<()>,
    /// The apps already warned, in this run, that they get TCP rather than the socket folder.
    warned: Mutex<HashSet<AppName>>,
}

impl Provisioner {
    pub fn new(admin: PostgresAdmin, root: &Path) -> Provisioner {
        Provisioner {
            admin,
            store: root.join("etc").join("postgres.yaml"),
            store_lock: Mutex::new(()),
            warned: Mutex::new(HashSet::new()),
        }
    }

    /// The credentials file.
    pub fn store_path(&self) -> &Path {
        &self.store
    }

    /// Makes sure `app` has its role and database and returns how to reach them. The first
    /// call for an app creates them and records the credentials; later calls reuse the
    /// record and recreate what was dropped by hand.
    pub fn provision(&self, app: &AppName) -> Result<Credentials, PgError> {
        let recorded = {
            let _guard = self.store_lock.lock().unwrap_or_else(|e| e.into_inner());
            store::read(&self.store)?.remove(app.as_str())
        };
        let (mut client, route) = self.connect()?;
        let mut creds = match recorded {
            Some(entry) => {
                let creds = self.recorded_credentials(app, entry)?;
                ensure_recorded_role(&mut client, app, &creds)?;
                ensure_database(&mut client, &creds)?;
                restrict_database(&mut client, app, &creds)?;
                creds
            }
            None => {
                let name = Identifier::for_app(app);
                let creds = Credentials {
                    server: self.admin.server.clone(),
                    database: name.clone(),
                    role: name,
                    password: random_password()?,
                };
                ensure_new_role(&mut client, app, &creds)?;
                ensure_database(&mut client, &creds)?;
                restrict_database(&mut client, app, &creds)?;
                // Recorded only now that the database exists: a failure above leaves
                // no record, and the next deploy resets the role's password to its own.
                let _guard = self.store_lock.lock().unwrap_or_else(|e| e.into_inner());
                let mut entries = store::read(&self.store)?;
                if let Some((other, _)) = entries.iter().find(|(_, e)| {
                    e.name == creds.database.as_str() || e.user == creds.role.as_str()
                }) {
                    return Err(PgError::Conflict(format!(
                        "the name {} is already recorded for the app {other} in {}",
                        creds.role,
                        self.store.display()
                    )));
                }
                entries.insert(
                    app.to_string(),
                    StoredEntry {
                        name: creds.database.to_string(),
                        user: creds.role.to_string(),
                        pass: creds.password.clone(),
                        server: self.admin.server.host.clone(),
                        port: self.admin.server.port,
                    },
                );
                store::write(&self.store, &entries)?;
                creds
            }
        };
        // The record keeps the server as configured; the app gets the way to it keter checked.
        creds.server = self.server_for_app(app, &mut client, &route, &creds);
        Ok(creds)
    }

    /// Validates a recorded entry. The app is given the server keter provisions on now; a
    /// record naming another one (Keter wrote `localhost:5432` by default) is only reported.
    fn recorded_credentials(
        &self,
        app: &AppName,
        entry: StoredEntry,
    ) -> Result<Credentials, PgError> {
        let bad = |what: &str, e: PgNameError| {
            PgError::Store(StoreError::Invalid {
                path: self.store.clone(),
                why: store::Invalid::Entry {
                    key: format!("{app}.{what}"),
                    why: e,
                },
            })
        };
        let database = Identifier::new(&entry.name).map_err(|e| bad("name", e))?;
        let role = Identifier::new(&entry.user).map_err(|e| bad("user", e))?;
        if entry.server != self.admin.server.host || entry.port != self.admin.server.port {
            log::warn!(
                "{app}: {} records its database on {}:{}; keter's postgres section names {}, which is used",
                self.store.display(),
                entry.server,
                entry.port,
                self.admin.server
            );
        }
        Ok(Credentials {
            server: self.admin.server.clone(),
            database,
            role,
            password: entry.pass,
        })
    }

    /// The admin's session, over a connection checked as [`listener`] says, and where it goes.
    fn connect(&self) -> Result<(Session, Route), PgError> {
        let login = Login {
            user: &self.admin.user,
            password: self.admin.password.as_ref(),
            database: &self.admin.database,
        };
        open_session(&self.admin.server, &self.trust(), &login)
    }

    /// Who may be the server, looked up now (a user created since keter started counts).
    fn trust(&self) -> Trust {
        Trust::resolve(&self.admin.server_user)
    }
}

/// A session on `server` for `login`, over a connection keter checked.
fn open_session(
    server: &Server,
    trust: &Trust,
    login: &Login,
) -> Result<(Session, Route), PgError> {
    let (stream, route) = listener::open(server, trust, CONNECT_TIMEOUT).map_err(|e| match e {
        OpenError::Unreachable(message) => PgError::Connect {
            server: server.to_string(),
            message,
        },
        OpenError::Untrusted(message) => PgError::Untrusted {
            server: server.to_string(),
            message,
        },
    })?;
    let session = Session::start(stream, login, CONNECT_TIMEOUT).map_err(|e| match e {
        StartError::Refused(r) => PgError::Untrusted {
            server: server.to_string(),
            message: r.to_string(),
        },
        StartError::Timeout(t) => PgError::Connect {
            server: server.to_string(),
            message: format!("no answer within {} s", t.as_secs()),
        },
        StartError::Postgres(e) => PgError::Connect {
            server: server.to_string(),
            message: describe(&e),
        },
        StartError::Io(e) => PgError::Connect {
            server: server.to_string(),
            message: e.to_string(),
        },
    })?;
    Ok((session, route))
}

/// 160 random bits from the OS generator, as 40 hex digits (safe in any shell or URL).
fn random_password() -> Result<Secret, PgError> {
    let mut bytes = [0u8; PASSWORD_BYTES];
    getrandom::fill(&mut bytes).map_err(|e| PgError::Random(e.to_string()))?;
    Ok(Secret(bytes.iter().map(|b| format!("{b:02x}")).collect()))
}

/// An SQL string literal; standard_conforming_strings (on since PostgreSQL 9.1) makes
/// doubling the quotes sufficient.
fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// The comment keter puts on the roles it creates, to recognise them later.
fn role_comment(app: &AppName) -> String {
    format!("keter: role of the app {app}")
}

fn sql(client: &mut Session, step: &str, statement: &str) -> Result<(), PgError> {
    client.batch_execute(statement).map_err(|e| PgError::Sql {
        step: step.to_string(),
        message: describe(&e),
    })
}

/// The comment of a role, `Ok(None)` if there is no such role.
fn role_comment_of(client: &mut Session, role: &Identifier) -> Result<Option<String>, PgError> {
    let row = client
        .query_opt(
            "SELECT coalesce(shobj_description(oid, 'pg_authid'), '') FROM pg_roles WHERE rolname = $1",
            &[&role.as_str()],
        )
        .map_err(|e| PgError::Sql {
            step: format!("looking up the role {role}"),
            message: describe(&e),
        })?;
    Ok(row.map(|r| r.get(0)))
}

/// Creates the role with its password (sent as a SCRAM hash), keter's comment and the admin's
/// membership (needed to create a database owned by it), all or nothing.
fn create_role(client: &mut Session, app: &AppName, creds: &Credentials) -> Result<(), PgError> {
    let role = creds.role.quoted();
    let hash = postgres_protocol::password::scram_sha_256(creds.password.expose().as_bytes());
    let statement = format!(
        "BEGIN; CREATE ROLE {role} LOGIN PASSWORD {}; COMMENT ON ROLE {role} IS {}; GRANT {role} TO CURRENT_USER; COMMIT;",
        literal(&hash),
        literal(&role_comment(app))
    );
    let result = sql(client, &format!("CREATE ROLE {}", creds.role), &statement);
    if result.is_err() {
        // A failed statement leaves the transaction aborted; end it so the session is usable.
        let _ = client.batch_execute("ROLLBACK");
    }
    result
}

/// First deploy: creates the role, or takes over the one a half-finished run of this app left
/// (recognised by keter's comment) and gives it the password about to be recorded.
fn ensure_new_role(
    client: &mut Session,
    app: &AppName,
    creds: &Credentials,
) -> Result<(), PgError> {
    match role_comment_of(client, &creds.role)? {
        None => create_role(client, app, creds),
        Some(comment) if comment == role_comment(app) => {
            let hash =
                postgres_protocol::password::scram_sha_256(creds.password.expose().as_bytes());
            log::info!(
                "{app}: the role {} is left from an earlier deploy that did not finish; resetting its password",
                creds.role
            );
            sql(
                client,
                &format!("ALTER ROLE {}", creds.role),
                &format!(
                    "ALTER ROLE {} LOGIN PASSWORD {}",
                    creds.role.quoted(),
                    literal(&hash)
                ),
            )
        }
        Some(_) => Err(PgError::Conflict(format!(
            "a role named {} already exists and was not created by keter for the app {app}; keter does not take it over (drop or rename it, or record it for this app in etc/postgres.yaml)",
            creds.role
        ))),
    }
}

/// Later deploys: a recorded role is used as it is; one dropped by hand is created again with
/// the recorded password.
fn ensure_recorded_role(
    client: &mut Session,
    app: &AppName,
    creds: &Credentials,
) -> Result<(), PgError> {
    if role_comment_of(client, &creds.role)?.is_none() {
        log::warn!(
            "{app}: the recorded role {} does not exist; creating it again",
            creds.role
        );
        create_role(client, app, creds)?;
    }
    Ok(())
}

/// Creates the database owned by the role unless it exists; an existing database must belong
/// to the role.
fn ensure_database(client: &mut Session, creds: &Credentials) -> Result<(), PgError> {
    let db = &creds.database;
    let owner: Option<String> = client
        .query_opt(
            "SELECT pg_get_userbyid(datdba)::text FROM pg_database WHERE datname = $1",
            &[&db.as_str()],
        )
        .map_err(|e| PgError::Sql {
            step: format!("looking up the database {db}"),
            message: describe(&e),
        })?
        .map(|r| r.get(0));
    match owner {
        Some(o) if o == creds.role.as_str() => Ok(()),
        Some(o) => Err(PgError::Conflict(format!(
            "a database named {db} already exists and belongs to the role {o}, not to {}; keter does not hand it to the app",
            creds.role
        ))),
        None => {
            // The admin must be a member of the owner (a role recorded by Keter may predate
            // keter's grant); granting an existing membership only raises a notice.
            sql(
                client,
                &format!("GRANT {} TO CURRENT_USER", creds.role),
                &format!("GRANT {} TO CURRENT_USER", creds.role.quoted()),
            )?;
            // CREATE DATABASE cannot run inside a transaction: it is sent alone.
            sql(
                client,
                &format!("CREATE DATABASE {db}"),
                &format!(
                    "CREATE DATABASE {} OWNER {}",
                    db.quoted(),
                    creds.role.quoted()
                ),
            )
        }
    }
}

/// Only the app's role may connect to its database. PostgreSQL grants CONNECT and TEMPORARY
/// on every new database to PUBLIC, so any other app's role (or any role of the server) could
/// connect and read its catalog; both are revoked from PUBLIC and CONNECT is granted to the
/// role. Run at every deploy, so that a database created by an earlier keter (or opened again
/// by hand) is closed by the next one. The admin acts as the owner through its membership in
/// the role, granted first where it is missing (a role Keter's plugin created as the
/// superuser); where the server refuses that (PostgreSQL 16 and later, for a role the admin
/// did not create), REVOKE only warns and the database stays open: that is logged with the
/// statement to run.
fn restrict_database(
    client: &mut Session,
    app: &AppName,
    creds: &Credentials,
) -> Result<(), PgError> {
    let (db, role) = (creds.database.quoted(), creds.role.quoted());
    // Outside a transaction, a refused GRANT leaves the session usable.
    if let Err(e) = client.batch_execute(&format!("GRANT {role} TO CURRENT_USER")) {
        log::debug!(
            "{app}: GRANT {} TO CURRENT_USER failed: {}",
            creds.role,
            describe(&e)
        );
    }
    sql(
        client,
        &format!("REVOKE CONNECT ON DATABASE {} FROM PUBLIC", creds.database),
        &format!(
            "REVOKE CONNECT, TEMPORARY ON DATABASE {db} FROM PUBLIC; GRANT CONNECT, TEMPORARY ON DATABASE {db} TO {role};"
        ),
    )?;
    let open: bool = client
        .query_one(
            "SELECT has_database_privilege('public', $1, 'CONNECT')",
            &[&creds.database.as_str()],
        )
        .map_err(|e| PgError::Sql {
            step: format!(
                "checking who may connect to the database {}",
                creds.database
            ),
            message: describe(&e),
        })?
        .get(0);
    if open {
        log::warn!(
            "{app}: every role of the server may connect to the database {} and keter's admin role cannot change that (it is not a member of the owner {}); run `REVOKE CONNECT, TEMPORARY ON DATABASE {db} FROM PUBLIC` as the owner or a superuser",
            creds.database,
            creds.role
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid(name: &str) -> bool {
        Identifier::new(name).is_ok()
    }

    #[test]
    fn plain_names_are_kept() {
        assert_eq!(derive_identifier("blog"), "blog");
        assert_eq!(derive_identifier("my_app2"), "my_app2");
        assert_eq!(
            Identifier::for_app(&AppName::new("shop").unwrap()).as_str(),
            "shop"
        );
    }

    #[test]
    fn hostile_and_lossy_names_become_valid_distinct_identifiers() {
        let names = [
            "x;drop",
            "x'drop",
            "x\"drop",
            "Robert'); DROP TABLE students;--",
            "My-App",
            "my_app",
            "my.app",
            "MY_APP",
            "1app",
            "pg_stats",
            "",
            "ünïcode",
        ];
        let derived: Vec<String> = names.iter().map(|n| derive_identifier(n)).collect();
        for (n, d) in names.iter().zip(&derived) {
            assert!(valid(d), "{n:?} gave {d:?}");
        }
        let mut unique = derived.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), derived.len(), "{derived:?}");
        assert!(derived[0].starts_with("x_drop_"), "{}", derived[0]);
        assert!(derived[8].starts_with("_1app_"), "{}", derived[8]);
        assert!(derived[9].starts_with("_pg_stats_"), "{}", derived[9]);
    }

    #[test]
    fn long_names_sharing_a_prefix_stay_distinct_and_fit() {
        let prefix = "a".repeat(90);
        let one = format!("{prefix}-one-1");
        let two = format!("{prefix}-two-2");
        assert_eq!(one.len(), 96);
        let (a, b) = (derive_identifier(&one), derive_identifier(&two));
        assert_ne!(a, b);
        for d in [&a, &b] {
            assert!(d.len() <= 63, "{d} is {} bytes", d.len());
            assert!(valid(d), "{d}");
        }
        // Exactly 63 valid bytes are kept; 64 are hashed.
        let exact = "b".repeat(63);
        assert_eq!(derive_identifier(&exact), exact);
        let over = "b".repeat(64);
        assert_eq!(derive_identifier(&over).len(), 63);
        assert_ne!(derive_identifier(&over), exact);
    }

    #[test]
    fn identifiers_refuse_what_sql_could_misread() {
        for bad in [
            "",
            "A",
            "a-b",
            "a;b",
            "a\"b",
            "1a",
            "pg_x",
            &"a".repeat(64),
            "é",
        ] {
            assert!(!valid(bad), "{bad:?} accepted");
        }
        assert_eq!(Identifier::new("ok_1").unwrap().quoted(), "\"ok_1\"");
    }

    #[test]
    fn urls_percent_encode_user_password_and_socket_folder() {
        assert_eq!(percent_encode("a-Z_0.~"), "a-Z_0.~");
        assert_eq!(
            percent_encode("p@ss:w/rd %?#"),
            "p%40ss%3Aw%2Frd%20%25%3F%23"
        );
        assert_eq!(percent_encode("é"), "%C3%A9");
        let creds = Credentials {
            server: Server::new("/var/run/postgresql", 5432).unwrap(),
            database: Identifier::new("shop").unwrap(),
            role: Identifier::new("shop").unwrap(),
            password: Secret::new("p@ss:w/rd".into()),
        };
        let env = creds.env();
        assert_eq!(
            env["DATABASE_URL"],
            "postgresql://shop:p%40ss%3Aw%2Frd@/shop?host=/var/run/postgresql&port=5432"
        );
        let odd = Credentials {
            server: Server::new("/run/pg&x#y", 5433).unwrap(),
            ..creds.clone()
        };
        assert!(
            odd.env()["DATABASE_URL"].ends_with("@/shop?host=/run/pg%26x%23y&port=5433"),
            "{}",
            odd.env()["DATABASE_URL"]
        );
        let v4 = Credentials {
            server: Server::new("127.0.0.1", 5432).unwrap(),
            ..creds.clone()
        };
        assert_eq!(
            v4.env()["DATABASE_URL"],
            "postgresql://shop:p%40ss%3Aw%2Frd@127.0.0.1:5432/shop"
        );
        assert_eq!(env["PGHOST"], "/var/run/postgresql");
        assert_eq!(env["PGPASS"], "p@ss:w/rd");
        assert_eq!(env["PGPASSWORD"], "p@ss:w/rd");
        assert_eq!(env["PGPORT"], "5432");
        assert_eq!(env["PGUSER"], "shop");
        assert_eq!(env["PGDATABASE"], "shop");
        let v6 = Credentials {
            server: Server::new("::1", 5433).unwrap(),
            ..creds
        };
        assert!(v6.env()["DATABASE_URL"].contains("@[::1]:5433/"));
    }

    #[test]
    fn servers_are_validated() {
        assert!(Server::new("localhost", 5432).is_ok());
        assert!(Server::new("127.0.0.1", 5432).is_ok());
        assert!(
            Server::new("/var/run/postgresql", 5432)
                .unwrap()
                .is_socket()
        );
        for bad in ["", "a b", "*.example.com", "x;y", "/a b"] {
            assert!(Server::new(bad, 5432).is_err(), "{bad:?} accepted");
        }
        assert!(Server::new("localhost", 0).is_err());
        assert_eq!(Server::new("::1", 5432).unwrap().to_string(), "[::1]:5432");
        assert_eq!(
            Server::new("127.0.0.1", 5432).unwrap().to_string(),
            "127.0.0.1:5432"
        );
    }

    #[test]
    fn passwords_are_long_random_and_never_printed() {
        let a = random_password().unwrap();
        let b = random_password().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.expose().len(), 40);
        assert_eq!(format!("{a:?}"), "Secret(..)");
    }

    #[test]
    fn literals_double_quotes() {
        assert_eq!(literal("it's"), "'it''s'");
    }
}
