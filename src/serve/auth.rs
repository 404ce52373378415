//! `POST /token` (OAuth2 client credentials, RFC 6749 §4.4) and reading bearer tokens.
//!
//! Tokens are 32 random bytes, base64url; only their sha256 is stored. Whether a token is valid
//! (known, not expired, user not revoked) is decided where the event is stored, in the writer's
//! transaction.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde_json::json;
use sqlx::PgPool;

use super::throttle::{Busy, Checks, Throttle, Throttled};
use crate::http::Posted;
use crate::users;

/// A hash to verify against when the client id is unknown, so that the answer takes as long as
/// for a wrong secret (and the review desk's sign-in for an unknown name).
pub(crate) static DUMMY_HASH: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| users::hash_secret("not a secret").expect("hashing a constant"));

/// What the token endpoint needs.
#[derive(Clone)]
pub struct TokenIssuer {
    pub pool: PgPool,
    pub ttl: Duration,
    /// The argon2 checks (each takes tens of ms and ~19 MiB): a bounded queue shared with the
    /// desk's sign-in, so a flood of token requests cannot starve event intake.
    pub checks: Checks,
    /// Repeated wrong secrets per address and client id.
    pub throttle: Throttle,
    /// `--trusted-proxy`: whose `X-Forwarded-For` names the client.
    pub trusted_proxies: Arc<Vec<IpAddr>>,
    /// `callrecon_intake_tokens_issued_total`.
    pub issued: prometheus_client::metrics::counter::Counter,
}

/// Why a request carries no usable bearer token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum NoToken {
    Missing,
    Malformed,
}

impl IntoResponse for NoToken {
    fn into_response(self) -> Response {
        match self {
            NoToken::Missing => {
                unauthorized(None, "missing `Authorization: Bearer <token>`; get a token from POST /token")
            }
            NoToken::Malformed => {
                unauthorized(Some("invalid_token"), "the Authorization header must be `Bearer <token>`")
            }
        }
    }
}

/// The bearer token of `Authorization: Bearer <token>`.
pub fn bearer(headers: &HeaderMap) -> Result<&str, NoToken> {
    let value = headers.get(header::AUTHORIZATION).ok_or(NoToken::Missing)?;
    match value.to_str().unwrap_or("").split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") && is_token(token.trim()) => Ok(token.trim()),
        _ => Err(NoToken::Malformed),
    }
}

fn is_token(t: &str) -> bool {
    !t.is_empty() && t.len() <= 512 && t.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._~+/=".contains(&b))
}

/// A 401 with the `WWW-Authenticate` challenge of RFC 6750.
pub fn unauthorized(error: Option<&str>, message: &str) -> Response {
    let challenge = match error {
        Some(e) => format!("Bearer realm=\"callrecon\", error=\"{e}\""),
        None => "Bearer realm=\"callrecon\"".to_owned(),
    };
    let mut resp =
        (StatusCode::UNAUTHORIZED, axum::Json(json!({"error": error.unwrap_or("unauthorized"), "message": message})))
            .into_response();
    resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_str(&challenge).expect("ASCII"));
    resp
}

/// `POST /token`: `grant_type=client_credentials` with `client_id`/`client_secret` as form
/// fields or HTTP Basic.
pub async fn token(
    State(issuer): State<TokenIssuer>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Result<Posted, crate::http::BodyError>,
) -> Response {
    let body = match body {
        Ok(Posted(body)) => body,
        Err(e) => return e.closing(oauth_error(e.status(), "invalid_request", &e.message())),
    };
    let (client_id, secret, used_basic) = match credentials(&headers, &body) {
        Ok(c) => c,
        Err(BadCredentials::Request(error, description)) => {
            return oauth_error(StatusCode::BAD_REQUEST, error, &description);
        }
        Err(BadCredentials::Missing) => {
            return invalid_client(false, "missing client_id and client_secret (form fields or HTTP Basic)");
        }
    };
    let address = super::throttle::client_address(peer.ip(), &headers, &issuer.trusted_proxies);
    let passed = match issuer.throttle.check(address, &client_id) {
        Ok(passed) => passed,
        Err(throttled) => {
            throttled.pause().await;
            return too_many(throttled);
        }
    };
    match issue(&issuer, &client_id, &secret, passed).await {
        Ok(Ok(Some(token))) => {
            issuer.throttle.succeeded(address, &client_id);
            issuer.issued.inc();
            let expires_in = issuer.ttl.as_secs().saturating_sub(1);
            let mut resp = axum::Json(json!({"access_token": token, "token_type": "bearer", "expires_in": expires_in}))
                .into_response();
            resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            resp.headers_mut().insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
            resp
        }
        Ok(Ok(None)) => {
            issuer.throttle.failed(address, &client_id);
            tracing::info!(client_id, %address, "token refused: unknown client, wrong secret, or revoked user");
            invalid_client(used_basic, "unknown client, wrong secret, or revoked user")
        }
        Ok(Err(Busy)) => checks_busy(),
        Err(e) => {
            tracing::error!(error = crate::db::error_line(&e), "issuing a token failed");
            oauth_error(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "could not issue a token; retry")
        }
    }
}

/// Why a token request names no client.
enum BadCredentials {
    /// 400: an OAuth error code and its description.
    Request(&'static str, String),
    /// 401: no client id and secret.
    Missing,
}

/// The client id, secret, and whether they came as HTTP Basic.
fn credentials(headers: &HeaderMap, body: &[u8]) -> Result<(String, String, bool), BadCredentials> {
    let mut grant_type = None;
    let mut form_id = None;
    let mut form_secret = None;
    for (k, v) in url::form_urlencoded::parse(body) {
        match &*k {
            "grant_type" => grant_type = Some(v.into_owned()),
            "client_id" => form_id = Some(v.into_owned()),
            "client_secret" => form_secret = Some(v.into_owned()),
            _ => {} // `scope` and extensions: not used
        }
    }
    let bad = |error: &'static str, description: &str| Err(BadCredentials::Request(error, description.to_owned()));
    let basic = match headers.get(header::AUTHORIZATION).map(basic_credentials) {
        None => None,
        Some(Some(pair)) => Some(pair),
        Some(None) => return bad("invalid_request", "unreadable Authorization header"),
    };
    match grant_type.as_deref() {
        Some("client_credentials") => {}
        None => return bad("invalid_request", "missing grant_type"),
        Some(other) => {
            let description = format!("grant_type {other:?} is not supported; use client_credentials");
            return bad("unsupported_grant_type", &description);
        }
    }
    let used_basic = basic.is_some();
    let (id, secret) = match (basic, form_id, form_secret) {
        (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
            return bad(
                "invalid_request",
                "give the client credentials either as HTTP Basic or as form fields, not both",
            );
        }
        (Some(pair), None, None) => pair,
        (None, Some(id), Some(secret)) => (id, secret),
        (None, _, _) => return Err(BadCredentials::Missing),
    };
    if id.contains('\0') || secret.contains('\0') {
        return bad("invalid_request", "client_id and client_secret cannot contain U+0000");
    }
    Ok((id, secret, used_basic))
}

/// 429: too many wrong secrets from this address or for this client id.
pub(crate) fn too_many(throttled: Throttled) -> Response {
    let description = format!(
        "too many wrong secrets for this client {}; retry in {} s",
        if throttled.by == "name" { "id" } else { "address" },
        throttled.retry_after_secs()
    );
    let mut resp = oauth_error(StatusCode::TOO_MANY_REQUESTS, "temporarily_unavailable", &description);
    resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(throttled.retry_after_secs()));
    resp
}

/// 503: the queue of password checks is full.
fn checks_busy() -> Response {
    let mut resp = oauth_error(
        StatusCode::SERVICE_UNAVAILABLE,
        "temporarily_unavailable",
        "too many secrets are being checked right now; retry in a second",
    );
    resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    resp
}

/// A new token for the active user with these credentials, `None` for wrong ones, or [`Busy`].
async fn issue(
    issuer: &TokenIssuer,
    client_id: &str,
    secret: &str,
    passed: bool,
) -> anyhow::Result<Result<Option<String>, Busy>> {
    let user: Option<(i64, String)> =
        sqlx::query_as("select id, secret_hash from api_users where client_id = $1 and revoked_at is null")
            .bind(client_id)
            .fetch_optional(&mut *crate::db::begin(&issuer.pool).await?)
            .await?;
    let known = user.is_some();
    let (user_id, hash) = user.unwrap_or((0, DUMMY_HASH.clone()));
    let ok = match issuer.checks.verify(secret, hash, passed).await {
        Ok(ok) => ok,
        Err(busy) => return Ok(Err(busy)),
    };
    if !(known && ok) {
        return Ok(Ok(None));
    }
    let token = users::random_string(32);
    let ttl = chrono::Duration::from_std(issuer.ttl)?;
    // The user may have been revoked while we verified: issue only to a still-active user.
    let insert = sqlx::query(
        "insert into api_tokens (token_sha256, user_id, expires_at)
         select $1, id, now() + $3::interval from api_users where id = $2 and revoked_at is null",
    )
    .bind(&users::token_digest(&token)[..])
    .bind(user_id)
    .bind(ttl);
    let issued = crate::db::execute(&issuer.pool, insert).await?;
    Ok(Ok((issued.rows_affected() == 1).then_some(token)))
}

/// `Authorization: Basic base64(urlencode(id):urlencode(secret))` (RFC 6749 §2.3.1); `None` if
/// the header is not readable as that.
fn basic_credentials(value: &HeaderValue) -> Option<(String, String)> {
    let (scheme, encoded) = value.to_str().ok()?.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = String::from_utf8(STANDARD.decode(encoded.trim()).ok()?).ok()?;
    let (id, secret) = decoded.split_once(':')?;
    let unescape =
        |s: &str| url::form_urlencoded::parse(format!("x={s}").as_bytes()).next().map(|(_, v)| v.into_owned());
    Some((unescape(id)?, unescape(secret)?))
}

fn invalid_client(used_basic: bool, message: &str) -> Response {
    let mut resp = oauth_error(StatusCode::UNAUTHORIZED, "invalid_client", message);
    if used_basic {
        resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"callrecon\""));
    }
    resp
}

fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response {
    let mut resp = (status, axum::Json(json!({"error": error, "error_description": description}))).into_response();
    resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_credentials_are_decoded_and_unescaped() {
        let v = HeaderValue::from_str(&format!("Basic {}", STANDARD.encode("cr-abc:s%2Bcret"))).unwrap();
        assert_eq!(basic_credentials(&v), Some(("cr-abc".to_owned(), "s+cret".to_owned())));
        assert_eq!(basic_credentials(&HeaderValue::from_static("Basic !!!")), None);
        assert_eq!(basic_credentials(&HeaderValue::from_static("Bearer abc")), None);
    }

    #[test]
    fn bearer_tokens_are_read_from_the_header() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), Err(NoToken::Missing));
        assert_eq!(bearer(&h).unwrap_err().into_response().status(), StatusCode::UNAUTHORIZED);
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("bearer abc-_1"));
        assert_eq!(bearer(&h).unwrap(), "abc-_1");
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer(&h), Err(NoToken::Malformed));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer "));
        assert!(bearer(&h).is_err());
    }
}
