//! Who a connection is, decided at the WebSocket upgrade, and for how long.
//!
//! `dev` (the default; refused in a farm or off loopback unless `--insecure-dev-auth`,
//! see `Config`) trusts `?user=`; `jwt` requires a token signed with the
//! configured HS256 secret or RS256/ES256 public key (PEM or JWKS), whose `sub` is the user,
//! and, when configured, whose `aud` and `iss` are this service's. Anything missing, forged,
//! expired or wrongly signed gets HTTP 401 and never a socket. A session lives until its
//! token's `exp` unless the client sends a newer token for the same user (`refresh`); the key
//! file is read again on SIGHUP and when it changes.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use arc_swap::ArcSwap;
use hyper::HeaderMap;
use hyper::header::{AUTHORIZATION, SEC_WEBSOCKET_PROTOCOL};
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header};
use serde::Deserialize;

use crate::config::{AuthMode, Config};
use crate::metrics::Metrics;
use crate::tasks::Tasks;
use fanfare_protocol as protocol;

/// The subprotocol a browser offers next to its token: `Sec-WebSocket-Protocol: bearer, <token>`.
pub const BEARER_PROTOCOL: &str = "bearer";

/// A verifying key, with the `kid` it answers to (JWKS) and its algorithm.
type Key = (Option<String>, DecodingKey, Algorithm);

pub struct Auth {
    mode: AuthMode,
    /// `--jwt-secret`'s key (never reloaded: it is a flag).
    secret: Option<Key>,
    /// `--jwt-key` and the keys last read from it.
    key_file: Option<PathBuf>,
    file_keys: ArcSwap<Vec<Key>>,
    audience: Vec<String>,
    issuer: Vec<String>,
    /// Clock skew tolerated on `exp` and `nbf` (seconds).
    leeway: u64,
}

/// The authenticated user, the subprotocol to confirm if the token came that way, and when
/// the session must end (the token's `exp` plus the leeway, Unix seconds; none in dev mode).
#[derive(Debug)]
pub struct Identity {
    pub user: Option<String>,
    pub protocol: Option<&'static str>,
    pub expires_at: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
}

impl Auth {
    pub fn from_config(config: &Config) -> anyhow::Result<Auth> {
        let mut secret = None;
        let mut file_keys = Vec::new();
        if config.auth == AuthMode::Jwt {
            if let Some(text) = &config.jwt_secret {
                if text.len() < 32 {
                    bail!("--jwt-secret must be at least 32 bytes");
                }
                secret = Some((
                    None,
                    DecodingKey::from_secret(text.as_bytes()),
                    Algorithm::HS256,
                ));
            }
            if let Some(path) = &config.jwt_key {
                file_keys = load_public_keys(path)?;
            }
            if secret.is_none() && file_keys.is_empty() {
                bail!("--auth jwt needs --jwt-secret or --jwt-key");
            }
        } else {
            tracing::warn!(
                "--auth dev: clients choose their user with ?user= (a node only its own machine reaches, or --insecure-dev-auth)"
            );
        }
        Ok(Auth {
            mode: config.auth,
            secret,
            key_file: config
                .jwt_key
                .clone()
                .filter(|_| config.auth == AuthMode::Jwt),
            file_keys: ArcSwap::from_pointee(file_keys),
            audience: config.jwt_audience.clone(),
            issuer: config.jwt_issuer.clone(),
            leeway: config.jwt_leeway,
        })
    }

    pub fn uses_tokens(&self) -> bool {
        self.mode == AuthMode::Jwt
    }

    /// Checks the upgrade request; `Err` is the reason for a 401.
    pub fn authenticate(
        &self,
        headers: &HeaderMap,
        query: Option<&str>,
    ) -> Result<Identity, String> {
        let requested_user = query_param(query, "user").filter(|u| !u.is_empty());
        if self.mode == AuthMode::Dev {
            return Ok(Identity {
                user: requested_user.map(str::to_owned),
                protocol: None,
                expires_at: None,
            });
        }
        let (token, protocol) = token_from(headers, query).ok_or("a token is required (Authorization: Bearer, ?token= or Sec-WebSocket-Protocol: bearer, <token>)")?;
        let (user, expires_at) = self.verify(token)?;
        if requested_user.is_some_and(|u| u != user) {
            return Err("?user= does not match the token".into());
        }
        Ok(Identity {
            user: Some(user),
            protocol,
            expires_at: Some(expires_at),
        })
    }

    /// A token's user and the moment a session on it ends (Unix seconds), or why it is refused.
    pub fn verify(&self, token: &str) -> Result<(String, u64), String> {
        let header = decode_header(token).map_err(|_| "malformed token".to_owned())?;
        let file_keys = self.file_keys.load();
        let mut last_error = String::from("no key accepts this token");
        for (kid, key, algorithm) in self.secret.iter().chain(file_keys.iter()) {
            if header.alg != *algorithm
                || (kid.is_some() && header.kid.is_some() && *kid != header.kid)
            {
                continue;
            }
            match decode::<Claims>(token, key, &self.validation(*algorithm)) {
                Ok(data) => {
                    let user = data.claims.sub;
                    if !protocol::is_valid_user(&user) {
                        return Err("the token's sub is not a valid user id".into());
                    }
                    return Ok((user, data.claims.exp.saturating_add(self.leeway)));
                }
                Err(err) => last_error = format!("invalid token: {err}"),
            }
        }
        Err(last_error)
    }

    fn validation(&self, algorithm: Algorithm) -> Validation {
        let mut validation = Validation::new(algorithm);
        validation.leeway = self.leeway;
        validation.validate_nbf = true;
        let mut required = vec!["exp", "sub"];
        if !self.audience.is_empty() {
            validation.set_audience(&self.audience);
            required.push("aud");
        }
        if !self.issuer.is_empty() {
            validation.set_issuer(&self.issuer);
            required.push("iss");
        }
        validation.set_required_spec_claims(&required);
        validation
    }

    /// Re-reads `--jwt-key`; a file that does not load is refused and the current keys stay.
    pub fn reload(&self) -> bool {
        let Some(path) = &self.key_file else {
            return true;
        };
        let what = format!("JWT keys {}", path.display());
        crate::edge::watch::take_or_keep(&what, load_public_keys(path), |keys| {
            self.file_keys.store(Arc::new(keys))
        })
    }

    /// Reloads the key file on SIGHUP and when it changes, until shutdown.
    pub fn spawn_watch(
        self: &Arc<Self>,
        tasks: &Tasks,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<()> {
        let Some(path) = self.key_file.clone() else {
            return Ok(());
        };
        let auth = self.clone();
        crate::edge::watch::spawn_reload(&[path.as_path()], "jwt_keys", tasks, metrics, move || {
            auth.reload()
        })
    }
}

fn token_from<'a>(
    headers: &'a HeaderMap,
    query: Option<&'a str>,
) -> Option<(&'a str, Option<&'static str>)> {
    if let Some(value) = headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok())
        && let Some(token) = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
    {
        return Some((token.trim(), None));
    }
    if let Some(token) = query_param(query, "token").filter(|t| !t.is_empty()) {
        return Some((token, None));
    }
    let offered = headers.get(SEC_WEBSOCKET_PROTOCOL)?.to_str().ok()?;
    let mut parts = offered.split(',').map(str::trim);
    if parts.next()? == BEARER_PROTOCOL {
        return parts.next().map(|token| (token, Some(BEARER_PROTOCOL)));
    }
    None
}

/// A query parameter's raw value (ids and tokens need no percent-decoding).
pub fn query_param<'q>(query: Option<&'q str>, name: &str) -> Option<&'q str> {
    query?
        .split('&')
        .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
}

/// RS256/ES256 public keys from a PEM file, or every signing key of a JWKS file.
fn load_public_keys(path: &Path) -> anyhow::Result<Vec<Key>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read --jwt-key {}", path.display()))?;
    if text.trim_start().starts_with('{') {
        let set: JwkSet = serde_json::from_str(&text)
            .with_context(|| format!("invalid JWKS in {}", path.display()))?;
        let mut keys = Vec::new();
        for jwk in &set.keys {
            let algorithm = match &jwk.algorithm {
                jsonwebtoken::jwk::AlgorithmParameters::RSA(_) => Algorithm::RS256,
                jsonwebtoken::jwk::AlgorithmParameters::EllipticCurve(_) => Algorithm::ES256,
                _ => continue,
            };
            let key = DecodingKey::from_jwk(jwk).context("unusable JWK")?;
            keys.push((jwk.common.key_id.clone(), key, algorithm));
        }
        if keys.is_empty() {
            bail!("no RSA or EC keys in {}", path.display());
        }
        return Ok(keys);
    }
    if let Ok(key) = DecodingKey::from_rsa_pem(text.as_bytes()) {
        return Ok(vec![(None, key, Algorithm::RS256)]);
    }
    if let Ok(key) = DecodingKey::from_ec_pem(text.as_bytes()) {
        return Ok(vec![(None, key, Algorithm::ES256)]);
    }
    bail!(
        "{} is neither an RSA nor an EC public key (PEM) nor a JWKS",
        path.display()
    )
}

#[cfg(test)]
mod tests {
    use super::query_param;

    #[test]
    fn reads_query_parameters() {
        assert_eq!(query_param(Some("user=ana&x=1"), "user"), Some("ana"));
        assert_eq!(query_param(Some("x=1&user"), "user"), Some(""));
        assert_eq!(query_param(Some("username=bob"), "user"), None);
        assert_eq!(query_param(None, "user"), None);
    }
}
