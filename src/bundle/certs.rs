//! A stanza's own certificate (`ssl: {key, certificate, chain-certificates}`): where its files
//! are and whether they make a pair Nginx can load.
//!
//! Paths are relative to `config/` and then stay inside the bundle, or absolute paths on the
//! host (`/etc/letsencrypt/live/...`, as Keter's README and Keter #299 show). `keter check`,
//! `keter render` and a deploy all resolve and read them here, so they give one verdict: the
//! files exist, are PEM, the key is not encrypted, and the key belongs to the certificate
//! (compared by public key for RSA and EC keys; other kinds are left to `nginx -t`).
//!
//! A file on the host is read with the rights of whoever deployed the bundle (the owner of the
//! bundle file, [`Reader`]): keter runs as root, and a deployer must not get a key it could not
//! read itself served on its hosts (README "Security").

use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use base64::Engine;

/// Certificate files, resolved to absolute paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertPaths {
    pub key: PathBuf,
    pub certificate: PathBuf,
    pub chain: Vec<PathBuf>,
}

/// What Nginx gets: the certificate followed by its chain, and the key.
pub struct CertBytes {
    pub certificate: Vec<u8>,
    pub key: Vec<u8>,
}

/// Larger files are refused: a certificate chain is a few KiB.
const MAX_FILE: u64 = 1 << 20;

/// Whose rights files on the host are read with: `None` is keter's own.
pub type Reader<'a> = Option<Deployer<'a>>;

/// A deployer's identity, for the files outside its bundle's folder.
#[derive(Debug, Clone, Copy)]
pub struct Deployer<'a> {
    pub ids: &'a crate::isolation::access::Ids,
    /// The unpacked bundle, symlinks resolved: its own files (made absolute by
    /// `bundle::check_config`) are read by keter, while the folder is still keter's alone.
    pub bundle: &'a Path,
}

/// Why a stanza's own certificate cannot be used. Every value names the file.
#[derive(Debug)]
pub enum CertError {
    /// A file of the bundle that cannot be resolved.
    Path(super::PathError),
    /// `path` cannot be read, or is not a file that can be.
    File { path: PathBuf, why: FileWhy },
    /// A file on the host could not be read as the deployer (the thread that takes their
    /// identity failed).
    AsDeployer {
        path: PathBuf,
        ids: String,
        source: io::Error,
    },
    /// What went wrong reading a file on the host as the deployer `ids`.
    Deployer { ids: String, inner: Box<CertError> },
    /// `path` holds no PEM certificate; `first` for the `certificate` file, whose message
    /// shows the header looked for.
    NoCertificate { path: PathBuf, first: bool },
    /// The key has a passphrase.
    Encrypted(PathBuf),
    /// `path` holds no PEM private key.
    NoKey(PathBuf),
    /// The certificate cannot be parsed.
    Unreadable(PathBuf),
    /// The key and the certificate are of different kinds.
    KindMismatch {
        key: PathBuf,
        key_kind: &'static str,
        certificate: PathBuf,
        cert_kind: &'static str,
    },
    /// The key is not the certificate's.
    NotPair { key: PathBuf, certificate: PathBuf },
}

/// Why a certificate file cannot be read.
#[derive(Debug)]
pub enum FileWhy {
    NotRegular,
    /// keter's own user may not read it (no deployer to read it as).
    Denied(io::Error),
    TooLarge,
    Io(io::Error),
}

impl CertError {
    /// The I/O error underneath, if the failure is one.
    pub fn io_error(&self) -> Option<&io::Error> {
        match self {
            CertError::Path(e) => e.io_error(),
            CertError::File {
                why: FileWhy::Denied(e) | FileWhy::Io(e),
                ..
            }
            | CertError::AsDeployer { source: e, .. } => Some(e),
            CertError::Deployer { inner, .. } => inner.io_error(),
            _ => None,
        }
    }
}

impl fmt::Display for CertError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CertError::Path(e) => write!(f, "{e}"),
            CertError::File { path, why } => {
                let p = path.display();
                match why {
                    FileWhy::NotRegular => write!(f, "{p} is not a regular file"),
                    FileWhy::Denied(e) => write!(
                        f,
                        "{p} cannot be read by this user ({e}); keter reads it as the user it runs as"
                    ),
                    FileWhy::TooLarge => write!(f, "{p} is larger than 1 MiB"),
                    FileWhy::Io(e) => write!(f, "{p}: {e}"),
                }
            }
            CertError::AsDeployer { path, ids, source } => {
                write!(f, "{}: cannot read it as {ids}: {source}", path.display())
            }
            CertError::Deployer { ids, inner } => write!(
                f,
                "{inner}; keter reads files on the host as the bundle's deployer ({ids}), the owner of the bundle file"
            ),
            CertError::NoCertificate { path, first: true } => write!(
                f,
                "{} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
                path.display()
            ),
            CertError::NoCertificate { path, first: false } => {
                write!(f, "{} holds no PEM certificate", path.display())
            }
            CertError::Encrypted(path) => write!(
                f,
                "{} is an encrypted key; Nginx needs it without a passphrase",
                path.display()
            ),
            CertError::NoKey(path) => write!(
                f,
                "{} holds no PEM private key (-----BEGIN ... PRIVATE KEY-----)",
                path.display()
            ),
            CertError::Unreadable(path) => {
                write!(f, "{} is not a certificate keter can read", path.display())
            }
            CertError::KindMismatch {
                key,
                key_kind,
                certificate,
                cert_kind,
            } => write!(
                f,
                "{} is a {key_kind} key, but {} holds a {cert_kind} certificate: they are not a pair",
                key.display(),
                certificate.display()
            ),
            CertError::NotPair { key, certificate } => write!(
                f,
                "{} is not the key of {}: they are not a pair",
                key.display(),
                certificate.display()
            ),
        }
    }
}

impl std::error::Error for CertError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            CertError::Path(e) => Some(e),
            CertError::Deployer { inner, .. } => Some(inner.as_ref()),
            _ => self.io_error().map(|e| e as _),
        }
    }
}

/// Runs `work` on `path` with `reader`'s rights if it is a file on the host.
fn on_host<T: Send>(
    path: &Path,
    reader: Reader,
    work: impl FnOnce() -> Result<T, CertError> + Send,
) -> Result<T, CertError> {
    match reader {
        Some(Deployer { ids, bundle }) if !path.starts_with(bundle) => {
            crate::isolation::access::as_user(ids, work)
                .map_err(|source| CertError::AsDeployer {
                    path: path.to_path_buf(),
                    ids: ids.to_string(),
                    source,
                })?
                .map_err(|inner| CertError::Deployer {
                    ids: ids.to_string(),
                    inner: Box::new(inner),
                })
        }
        _ => work(),
    }
}

/// Resolves one file of a stanza's `ssl`: relative to `config/` inside the bundle, or an
/// absolute path on the host.
pub fn resolve(dir: &Path, path: &Path, reader: Reader) -> Result<PathBuf, CertError> {
    if !path.is_absolute() {
        return super::resolve_file(dir, path).map_err(CertError::Path);
    }
    let file = |why| CertError::File {
        path: path.to_path_buf(),
        why,
    };
    on_host(path, reader, || match fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(crate::config::normalize(path)),
        Ok(_) => Err(file(FileWhy::NotRegular)),
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied && reader.is_none() => {
            Err(file(FileWhy::Denied(e)))
        }
        Err(e) => Err(file(FileWhy::Io(e))),
    })
}

/// Reads a stanza's own certificate, its paths made absolute by `bundle::check_config`;
/// `None` for a stanza without one.
pub fn read_own(tls: &super::Tls, reader: Reader) -> Result<Option<CertBytes>, CertError> {
    let super::Tls::Own {
        key,
        certificate,
        chain,
    } = tls
    else {
        return Ok(None);
    };
    read(
        &CertPaths {
            key: key.clone(),
            certificate: certificate.clone(),
            chain: chain.clone(),
        },
        reader,
    )
    .map(Some)
}

/// Reads the files and checks that they form a pair Nginx can load.
pub fn read(paths: &CertPaths, reader: Reader) -> Result<CertBytes, CertError> {
    let read_file = |p: &Path| on_host(p, reader, || read_file(p));
    let mut certificate = read_file(&paths.certificate)?;
    let cert_der = first_block(&certificate, |label| label == "CERTIFICATE").ok_or_else(|| {
        CertError::NoCertificate {
            path: paths.certificate.clone(),
            first: true,
        }
    })?;
    for c in &paths.chain {
        let bytes = read_file(c)?;
        if first_block(&bytes, |label| label == "CERTIFICATE").is_none() {
            return Err(CertError::NoCertificate {
                path: c.clone(),
                first: false,
            });
        }
        if !certificate.ends_with(b"\n") {
            certificate.push(b'\n');
        }
        certificate.extend(bytes);
    }
    let key = read_file(&paths.key)?;
    let text = String::from_utf8_lossy(&key);
    if text.contains("ENCRYPTED") {
        return Err(CertError::Encrypted(paths.key.clone()));
    }
    let (label, key_der) = first_labelled(&key, |label| label.ends_with("PRIVATE KEY"))
        .ok_or_else(|| CertError::NoKey(paths.key.clone()))?;
    let cert_key = certificate_key(&cert_der)
        .ok_or_else(|| CertError::Unreadable(paths.certificate.clone()))?;
    match private_key_public_part(&label, &key_der) {
        Some(k) if k == cert_key => Ok(CertBytes { certificate, key }),
        Some(k) if k.kind != cert_key.kind => Err(CertError::KindMismatch {
            key: paths.key.clone(),
            key_kind: k.kind.name(),
            certificate: paths.certificate.clone(),
            cert_kind: cert_key.kind.name(),
        }),
        Some(_) => Err(CertError::NotPair {
            key: paths.key.clone(),
            certificate: paths.certificate.clone(),
        }),
        // A kind of key whose public half keter cannot read (Ed25519 without it): Nginx's own
        // test at the switch still checks the pair.
        None => Ok(CertBytes { certificate, key }),
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, CertError> {
    let file = |why| CertError::File {
        path: path.to_path_buf(),
        why,
    };
    let meta = fs::metadata(path).map_err(|e| file(FileWhy::Io(e)))?;
    if meta.len() > MAX_FILE {
        return Err(file(FileWhy::TooLarge));
    }
    fs::read(path).map_err(|e| file(FileWhy::Io(e)))
}

/// The DER bytes of the first PEM block whose label passes `want`.
fn first_block(pem: &[u8], want: impl Fn(&str) -> bool) -> Option<Vec<u8>> {
    first_labelled(pem, want).map(|(_, der)| der)
}

fn first_labelled(pem: &[u8], want: impl Fn(&str) -> bool) -> Option<(String, Vec<u8>)> {
    let text = String::from_utf8_lossy(pem);
    let mut rest: &str = &text;
    while let Some(start) = rest.find("-----BEGIN ") {
        let after = &rest[start + 11..];
        let label_end = after.find("-----")?;
        let label = after[..label_end].to_string();
        let body = &after[label_end + 5..];
        let end = body.find("-----END ")?;
        if want(&label) {
            let b64: String = body[..end]
                .chars()
                .filter(|c| !c.is_ascii_whitespace())
                .collect();
            let der = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
            return Some((label, der));
        }
        rest = &body[end..];
    }
    None
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyKind {
    Rsa,
    Ec,
    Other,
}

impl KeyKind {
    fn name(self) -> &'static str {
        match self {
            KeyKind::Rsa => "RSA",
            KeyKind::Ec => "EC",
            KeyKind::Other => "non-RSA, non-EC",
        }
    }
}

/// A public key in a form both halves can be compared in: RSA's modulus and exponent, or an
/// EC point.
#[derive(Debug, PartialEq, Eq)]
struct PublicKey {
    kind: KeyKind,
    bytes: Vec<u8>,
}

const OID_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
const OID_EC: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];

/// The subject public key of an X.509 certificate.
fn certificate_key(der: &[u8]) -> Option<PublicKey> {
    let cert = Der::new(der).next()?.expect(0x30)?;
    let mut tbs = Der::new(Der::new(cert).next()?.expect(0x30)?);
    let mut field = tbs.next()?;
    if field.tag == 0xa0 {
        field = tbs.next()?; // the optional version came first
    }
    // `field` is the serial number; then the signature algorithm, issuer, validity and
    // subject, then the key.
    field.expect(0x02)?;
    for _ in 0..4 {
        tbs.next()?;
    }
    let mut spki = Der::new(tbs.next()?.expect(0x30)?);
    let alg = spki.next()?.expect(0x30)?;
    let oid = Der::new(alg).next()?.expect(0x06)?;
    let bits = bit_string(spki.next()?.expect(0x03)?)?;
    match oid {
        OID_RSA => rsa_public(bits),
        OID_EC => Some(PublicKey {
            kind: KeyKind::Ec,
            bytes: bits.to_vec(),
        }),
        _ => Some(PublicKey {
            kind: KeyKind::Other,
            bytes: bits.to_vec(),
        }),
    }
}

/// The public half of a private key in PKCS#1 (`RSA PRIVATE KEY`), SEC 1 (`EC PRIVATE KEY`)
/// or PKCS#8 (`PRIVATE KEY`) form; `None` when the key does not carry it.
fn private_key_public_part(label: &str, der: &[u8]) -> Option<PublicKey> {
    match label {
        "RSA PRIVATE KEY" => rsa_private(der),
        "EC PRIVATE KEY" => ec_private(der),
        "PRIVATE KEY" => {
            let mut info = Der::new(Der::new(der).next()?.expect(0x30)?);
            info.next()?.expect(0x02)?; // version
            let alg = info.next()?.expect(0x30)?;
            let oid = Der::new(alg).next()?.expect(0x06)?;
            let inner = info.next()?.expect(0x04)?;
            match oid {
                OID_RSA => rsa_private(inner),
                OID_EC => ec_private(inner),
                _ => {
                    // PKCS#8 v2 may carry the public key as [1].
                    let public = std::iter::from_fn(|| info.next()).find(|t| t.tag == 0x81)?;
                    Some(PublicKey {
                        kind: KeyKind::Other,
                        bytes: public.value.get(1..)?.to_vec(),
                    })
                }
            }
        }
        _ => None,
    }
}

fn rsa_public(der: &[u8]) -> Option<PublicKey> {
    let mut seq = Der::new(Der::new(der).next()?.expect(0x30)?);
    let n = seq.next()?.expect(0x02)?;
    let e = seq.next()?.expect(0x02)?;
    Some(rsa_key(n, e))
}

fn rsa_private(der: &[u8]) -> Option<PublicKey> {
    let mut seq = Der::new(Der::new(der).next()?.expect(0x30)?);
    seq.next()?.expect(0x02)?; // version
    let n = seq.next()?.expect(0x02)?;
    let e = seq.next()?.expect(0x02)?;
    Some(rsa_key(n, e))
}

fn rsa_key(n: &[u8], e: &[u8]) -> PublicKey {
    let strip = |b: &[u8]| {
        let first = b.iter().position(|x| *x != 0).unwrap_or(b.len());
        b[first..].to_vec()
    };
    let mut bytes = strip(n);
    bytes.push(0xff); // a separator that cannot start an integer without leading zeros
    bytes.extend(strip(e));
    PublicKey {
        kind: KeyKind::Rsa,
        bytes,
    }
}

fn ec_private(der: &[u8]) -> Option<PublicKey> {
    let mut seq = Der::new(Der::new(der).next()?.expect(0x30)?);
    seq.next()?.expect(0x02)?; // version
    seq.next()?.expect(0x04)?; // the private key
    let public = std::iter::from_fn(|| seq.next()).find(|t| t.tag == 0xa1)?;
    let bits = bit_string(Der::new(public.value).next()?.expect(0x03)?)?;
    Some(PublicKey {
        kind: KeyKind::Ec,
        bytes: bits.to_vec(),
    })
}

/// A BIT STRING's bits (whole bytes only, as keys are).
fn bit_string(v: &[u8]) -> Option<&[u8]> {
    match v.split_first() {
        Some((0, bits)) => Some(bits),
        _ => None,
    }
}

/// One DER element.
struct Tlv<'a> {
    tag: u8,
    value: &'a [u8],
}

impl<'a> Tlv<'a> {
    fn expect(self, tag: u8) -> Option<&'a [u8]> {
        (self.tag == tag).then_some(self.value)
    }
}

/// The elements of DER-encoded bytes, one after the other.
struct Der<'a> {
    rest: &'a [u8],
}

impl<'a> Der<'a> {
    fn new(bytes: &'a [u8]) -> Der<'a> {
        Der { rest: bytes }
    }

    fn next(&mut self) -> Option<Tlv<'a>> {
        let (&tag, rest) = self.rest.split_first()?;
        let (&first, mut rest) = rest.split_first()?;
        let len = if first < 0x80 {
            usize::from(first)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 4 || rest.len() < n {
                return None;
            }
            let len = rest[..n]
                .iter()
                .fold(0usize, |a, b| (a << 8) | usize::from(*b));
            rest = &rest[n..];
            len
        };
        if rest.len() < len {
            return None;
        }
        let (value, after) = rest.split_at(len);
        self.rest = after;
        Some(Tlv { tag, value })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn openssl(args: &[&str]) {
        let ok = Command::new("openssl")
            .args(args)
            .stderr(std::process::Stdio::null())
            .status()
            .expect("openssl makes the test certificates (apt-get install openssl)")
            .success();
        assert!(ok, "openssl {args:?}");
    }

    /// A self-signed certificate and its key in `dir`; `traditional` rewrites the key in the
    /// older PKCS#1 (`RSA PRIVATE KEY`) or SEC 1 (`EC PRIVATE KEY`) form instead of PKCS#8.
    fn pair(dir: &Path, name: &str, newkey: &str, traditional: bool) -> CertPaths {
        let key = dir.join(format!("{name}.key"));
        let cert = dir.join(format!("{name}.crt"));
        openssl(&[
            "req",
            "-x509",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=t.example.com",
            "-newkey",
            newkey,
            "-keyout",
            key.to_str().unwrap(),
            "-out",
            cert.to_str().unwrap(),
        ]);
        if traditional {
            let old = dir.join(format!("{name}.pkcs8"));
            fs::rename(&key, &old).unwrap();
            let (old, k) = (old.to_str().unwrap(), key.to_str().unwrap());
            if newkey.starts_with("rsa") {
                openssl(&["rsa", "-in", old, "-out", k, "-traditional"]);
            } else {
                openssl(&["ec", "-in", old, "-out", k]);
            }
            let text = fs::read_to_string(&key).unwrap();
            assert!(
                text.contains("-----BEGIN RSA PRIVATE KEY")
                    || text.contains("-----BEGIN EC PRIVATE KEY"),
                "{text}"
            );
        }
        CertPaths {
            key,
            certificate: cert,
            chain: vec![],
        }
    }

    #[test]
    fn pairs_of_every_common_form_and_mismatches() {
        let dir = std::env::temp_dir().join(format!("keter-unit-certs-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let ec_params = dir.join("p256.pem");
        openssl(&[
            "ecparam",
            "-name",
            "prime256v1",
            "-out",
            ec_params.to_str().unwrap(),
        ]);
        let ec = format!("ec:{}", ec_params.display());
        let rsa8 = pair(&dir, "rsa8", "rsa:2048", false);
        let rsa1 = pair(&dir, "rsa1", "rsa:2048", true);
        let ec8 = pair(&dir, "ec8", &ec, false);
        let ecsec1 = pair(&dir, "ecsec1", &ec, true);
        for p in [&rsa8, &rsa1, &ec8, &ecsec1] {
            read(p, None).unwrap_or_else(|e| panic!("{p:?}: {e}"));
        }
        let swapped = CertPaths {
            key: rsa1.key.clone(),
            ..rsa8.clone()
        };
        let e = read(&swapped, None).err().unwrap().to_string();
        assert!(e.contains("is not the key of"), "{e}");
        let mixed = CertPaths {
            key: ec8.key.clone(),
            ..rsa8.clone()
        };
        let e = read(&mixed, None).err().unwrap().to_string();
        assert!(e.contains("is a EC key, but"), "{e}");
        let e = read(
            &CertPaths {
                key: rsa8.certificate.clone(),
                ..rsa8.clone()
            },
            None,
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("holds no PEM private key"), "{e}");
        let chained = CertPaths {
            chain: vec![ec8.certificate.clone()],
            ..rsa8.clone()
        };
        let bytes = read(&chained, None).unwrap();
        assert_eq!(
            String::from_utf8_lossy(&bytes.certificate)
                .matches("BEGIN CERTIFICATE")
                .count(),
            2
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
