//! Keter's middlewares as Nginx directives: the `limit_req_zone`s and `map`s an app's file
//! declares at the http level, the directives of each content location, and the password file
//! of basic authentication.
//!
//! Rate limits: a Keter throttle of `limit` requests per `period` seconds becomes
//! `limit_req_zone KEY zone=... rate=limit/period` and `limit_req ... burst=limit-1 nodelay`,
//! so `limit` requests pass at once and the allowance comes back at Keter's average rate;
//! a request over it gets 429, as from Keter's rate limiter. A client without the header or
//! cookie a throttle counts by is not counted (Nginx skips an empty key), as in Keter.

use base64::Engine;
use serde::Serialize;

use super::RenderError;
use super::objects::{Object, object_name};
use crate::bundle::middleware::{Identifier, Middlewares, Throttle, Zone};
use crate::names::AppName;

/// A `limit_req_zone` of the app.
#[derive(Debug, Clone, Serialize)]
pub(super) struct ZoneView {
    pub name: String,
    /// Text and variables; requests whose key is empty are not counted.
    pub key: String,
    pub rate: String,
}

/// A `map` giving a throttle's key only when what it counts by is present.
#[derive(Debug, Clone, Serialize)]
pub(super) struct MapView {
    pub source: String,
    pub variable: String,
    pub value: String,
}

/// The middleware directives of a content location.
#[derive(Debug, Clone, Default, Serialize)]
pub(super) struct LocationView {
    pub limit_reqs: Vec<LimitView>,
    pub auth: Option<AuthView>,
    pub local: Option<LocalView>,
    pub headers: Vec<HeaderView>,
    /// `proxy_method $keter_autohead_method` (proxied content only).
    pub autohead: bool,
}

#[derive(Debug, Clone, Serialize)]
pub(super) struct LimitView {
    pub zone: String,
    /// 0 is left out of the directive: Nginx refuses `burst=0` (a throttle of `limit: 1`).
    pub burst: u32,
}

#[derive(Debug, Clone, Serialize)]
pub(super) struct AuthView {
    pub realm: String,
    pub file: String,
}

#[derive(Debug, Clone, Serialize)]
pub(super) struct LocalView {
    pub status: u16,
    pub message: String,
}

#[derive(Debug, Clone, Serialize)]
pub(super) struct HeaderView {
    pub name: String,
    pub value: String,
}

/// The http-level declarations of an app's throttles, numbered across the whole app.
#[derive(Debug, Default)]
pub(super) struct Declarations {
    pub zones: Vec<ZoneView>,
    pub maps: Vec<MapView>,
}

impl Declarations {
    /// Declares `throttles` and returns what the location applies.
    fn declare(&mut self, app: &AppName, throttles: &[Throttle]) -> Vec<LimitView> {
        let mut out = Vec::new();
        for t in throttles {
            let n = self.zones.len() + 1;
            let name = object_name(app, Object::Zone(n));
            let (presence, ident) = match &t.identifier {
                Identifier::Ip => (None, "$binary_remote_addr".to_string()),
                Identifier::IpAndPath => (None, "$binary_remote_addr$uri".to_string()),
                Identifier::IpAndUserAgent => (
                    Some("$http_user_agent".to_string()),
                    "$binary_remote_addr$http_user_agent".to_string(),
                ),
                Identifier::Header(h) => (Some(h.request_variable()), h.request_variable()),
                Identifier::Cookie(c) => (Some(c.request_variable()), c.request_variable()),
                Identifier::HeaderAndIp(h) => (
                    Some(h.request_variable()),
                    format!("{}$binary_remote_addr", h.request_variable()),
                ),
            };
            let zone = match &t.zone {
                Zone::Default => None,
                Zone::Ip => Some("$binary_remote_addr".to_string()),
                Zone::Header(h) => Some(h.request_variable()),
            };
            let value = match &zone {
                Some(z) => format!("{z}|{ident}"),
                None => ident.clone(),
            };
            let key = match presence {
                // The key alone is empty when its header or cookie is missing.
                Some(p) if p == ident && zone.is_none() => ident,
                Some(p) => {
                    let variable = format!("${}", object_name(app, Object::Variable(n)));
                    self.maps.push(MapView {
                        source: p,
                        variable: variable.clone(),
                        value,
                    });
                    variable
                }
                None => value,
            };
            self.zones.push(ZoneView {
                name: name.clone(),
                key,
                rate: t.rate.nginx(),
            });
            out.push(LimitView {
                zone: name,
                burst: t.burst(),
            });
        }
        out
    }
}

/// The location directives of one stanza's middlewares; its throttles are declared in `decl`.
/// A basic-auth without its password file is an error: a middleware is never dropped.
pub(super) fn location(
    app: &AppName,
    m: &Middlewares,
    auth_file: Option<String>,
    proxied: bool,
    decl: &mut Declarations,
) -> Result<LocationView, RenderError> {
    if m.basic_auth.is_some() && auth_file.is_none() {
        return Err(RenderError::NoPasswordFile(app.clone()));
    }
    Ok(LocationView {
        limit_reqs: decl.declare(app, &m.throttles),
        auth: m
            .basic_auth
            .as_ref()
            .zip(auth_file)
            .map(|(a, file)| AuthView {
                realm: a.realm.as_str().to_string(),
                file,
            }),
        local: m.local.as_ref().map(|l| LocalView {
            status: l.status,
            message: l.message.as_str().to_string(),
        }),
        headers: m
            .headers
            .iter()
            .map(|(n, v)| HeaderView {
                name: n.as_str().to_string(),
                value: v.as_str().to_string(),
            })
            .collect(),
        autohead: m.autohead && proxied,
    })
}

/// The password file of a basic-auth middleware: `user:{SSHA}...` lines (salted SHA-1, which
/// Nginx checks without the cost of crypt(); the plain passwords are in the bundle anyway).
pub fn htpasswd(users: &[(String, String)]) -> Vec<u8> {
    use sha1::{Digest, Sha1};
    let mut out = String::new();
    for (user, password) in users {
        let mut salt = [0u8; 8];
        if getrandom::fill(&mut salt).is_err() {
            // A fixed salt only weakens the hash against precomputed tables; the file stays
            // readable by Nginx's workers alone.
            salt = *b"keterslt";
        }
        let mut h = Sha1::new();
        h.update(password.as_bytes());
        h.update(salt);
        let mut digest = h.finalize().to_vec();
        digest.extend_from_slice(&salt);
        let encoded = base64::engine::general_purpose::STANDARD.encode(digest);
        out.push_str(&format!("{user}:{{SSHA}}{encoded}\n"));
    }
    out.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bundle::middleware::{HeaderName, Rate};

    fn throttle(identifier: Identifier, zone: Zone) -> Throttle {
        Throttle {
            name: "t".into(),
            limit: 10,
            period: 60,
            rate: Rate::PerMinute(10),
            identifier,
            zone,
        }
    }

    #[test]
    fn keys_skip_requests_without_what_they_count_by() {
        let app = AppName::new("my-app.v2").unwrap();
        let key = HeaderName::new("X-Api-Key").unwrap();
        let mut d = Declarations::default();
        let limits = d.declare(
            &app,
            &[
                throttle(Identifier::Ip, Zone::Default),
                throttle(Identifier::Header(key.clone()), Zone::Default),
                throttle(Identifier::Header(key.clone()), Zone::Ip),
                throttle(Identifier::IpAndUserAgent, Zone::Default),
            ],
        );
        assert_eq!(limits[0].zone, "keter_my_happ_dv2_rl1");
        assert_eq!(limits[0].burst, 9);
        let keys: Vec<&str> = d.zones.iter().map(|z| z.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "$binary_remote_addr",
                "$http_x_api_key",
                "$keter_my_happ_dv2_rl3",
                "$keter_my_happ_dv2_rl4"
            ]
        );
        assert_eq!(d.maps[0].source, "$http_x_api_key");
        assert_eq!(d.maps[0].value, "$binary_remote_addr|$http_x_api_key");
        assert_eq!(d.zones[0].rate, "10r/m");
    }

    #[test]
    fn password_file_lines() {
        let text = String::from_utf8(htpasswd(&[("jon".into(), "rocks".into())])).unwrap();
        let (user, hash) = text.trim_end().split_once(':').unwrap();
        assert_eq!(user, "jon");
        let raw = base64::engine::general_purpose::STANDARD
            .decode(hash.strip_prefix("{SSHA}").unwrap())
            .unwrap();
        use sha1::{Digest, Sha1};
        let (digest, salt) = raw.split_at(20);
        let mut h = Sha1::new();
        h.update(b"rocks");
        h.update(salt);
        assert_eq!(h.finalize().as_slice(), digest);
    }
}
