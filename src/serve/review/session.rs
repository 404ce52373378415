//! Analysts' sign-in: the session cookie, its row in `review_sessions`, the CSRF token of every
//! form, and the one-time message a form's answer leaves for the page it redirects to.
//!
//! The session token (32 random bytes) lives only in the analyst's cookie (HttpOnly,
//! SameSite=Strict, `Secure` with `--secure-cookies`, path `/review`); the table keeps its sha256
//! digest, with the time it expires. A form's CSRF token is derived from the session token
//! (sha256 of it with a label), so it is checked without being stored, differs from what the
//! table holds, and cannot be made by a page that cannot read the cookie. The sign-in form,
//! before there is a session, has a cookie of its own holding a random nonce, and its token is
//! an HMAC of that nonce under the installation's key (`installation_keys`, made by `migrate`):
//! a cookie planted by someone else carries no token they could compute. Every form post is
//! also refused when the browser says it comes from another site (`Sec-Fetch-Site`, `Origin`).

use std::time::Duration;

use anyhow::{Context, Result};
use axum::http::{HeaderMap, HeaderValue, header};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{KeyInit as _, Mac as _};
use sha2::{Digest as _, Sha256};
use sqlx::PgPool;

use crate::serve::throttle::{Busy, Checks};
use crate::users;

/// The session cookie.
pub const COOKIE: &str = "callrecon_review";
/// The sign-in form's CSRF cookie.
pub const LOGIN_COOKIE: &str = "callrecon_login";

/// A signed-in analyst.
#[derive(Debug, Clone)]
pub struct Analyst {
    pub name: String,
    /// The token of this session's forms.
    pub csrf: String,
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim())
}

/// A `Set-Cookie` value: HttpOnly, SameSite=Strict, path `/review`, `Secure` when asked;
/// `max_age` 0 deletes the cookie.
pub fn set_cookie(name: &str, value: &str, max_age: Duration, secure: bool) -> HeaderValue {
    let secure = if secure { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{name}={value}; Path=/review; Max-Age={}; HttpOnly; SameSite=Strict{secure}",
        max_age.as_secs()
    ))
    .expect("cookie values are base64url")
}

/// The CSRF token of the forms of the session (or sign-in form) whose cookie holds `token`.
pub fn csrf_of(token: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"callrecon review csrf\0");
    h.update(token.as_bytes());
    URL_SAFE_NO_PAD.encode(h.finalize())
}

/// Whether `given` is the CSRF token for `token`, compared in constant time.
pub fn csrf_ok(token: &str, given: &str) -> bool {
    let expected = csrf_of(token);
    expected.len() == given.len() && expected.bytes().zip(given.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

/// The installation's key of the sign-in form's tokens.
#[derive(Clone)]
pub struct LoginKey(std::sync::Arc<Vec<u8>>);

impl LoginKey {
    /// The key `migrate` made (migration 0018).
    pub async fn read(pool: &PgPool) -> Result<LoginKey> {
        // In a transaction of callrecon's own: behind a transaction pooler only it has the search path.
        let mut tx = crate::db::begin(pool).await.context("reading the sign-in form's key")?;
        let key: Vec<u8> = sqlx::query_scalar("select key from installation_keys where purpose = 'login_csrf'")
            .fetch_one(&mut *tx)
            .await
            .context("reading the sign-in form's key (installation_keys; run callrecon migrate)")?;
        anyhow::ensure!(key.len() >= 32, "installation_keys' login_csrf key is shorter than 32 bytes");
        Ok(LoginKey(std::sync::Arc::new(key)))
    }

    fn mac(&self, nonce: &str) -> hmac::Hmac<Sha256> {
        let mut mac = hmac::Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(b"callrecon sign-in csrf\0");
        mac.update(nonce.as_bytes());
        mac
    }

    /// The sign-in form's CSRF token for the nonce of its cookie.
    pub fn csrf_of(&self, nonce: &str) -> String {
        URL_SAFE_NO_PAD.encode(self.mac(nonce).finalize().into_bytes())
    }

    /// Whether `given` is the token for `nonce` (compared in constant time).
    pub fn csrf_ok(&self, nonce: &str, given: &str) -> bool {
        !nonce.is_empty() && URL_SAFE_NO_PAD.decode(given).is_ok_and(|tag| self.mac(nonce).verify_slice(&tag).is_ok())
    }
}

/// `Err` with why, when the browser says a form post comes from another site: `Sec-Fetch-Site`
/// other than `same-origin` (or `none`, typed by the user), or an `Origin` whose host is not the
/// request's `Host`. A client sending neither (not a browser, or an old one) is judged by the
/// CSRF token alone.
pub fn same_site(headers: &HeaderMap) -> Result<(), &'static str> {
    let text = |name: &str| headers.get(name).map(|v| v.to_str().unwrap_or("?"));
    if let Some(site) = text("sec-fetch-site") {
        return match site {
            "same-origin" | "none" => Ok(()),
            _ => Err("the browser says this form was posted from another site (Sec-Fetch-Site)"),
        };
    }
    let Some(origin) = text("origin") else { return Ok(()) };
    let host = text("host").unwrap_or_default();
    let origin_host = origin.split_once("://").map(|(_, h)| h.trim_end_matches('/'));
    match origin_host {
        Some(h) if !host.is_empty() && h.eq_ignore_ascii_case(host) => Ok(()),
        _ => Err("the browser says this form was posted from another site (Origin is not this host)"),
    }
}

/// The analyst whose unexpired session the request's cookie holds (an active user who still has
/// the Analyst role), or `None`.
pub async fn current(pool: &PgPool, headers: &HeaderMap) -> Result<Option<Analyst>> {
    let Some(token) = cookie(headers, COOKIE) else { return Ok(None) };
    let name: Option<String> = sqlx::query_scalar(
        "select u.name from review_sessions s join api_users u on u.id = s.user_id
         where s.token_sha256 = $1 and s.expires_at > now() and u.revoked_at is null and $2 = any(u.roles)",
    )
    .bind(&users::token_digest(token)[..])
    .bind(users::ROLE_ANALYST)
    .fetch_optional(pool)
    .await
    .context("reading the session")?;
    Ok(name.map(|name| Analyst { name, csrf: csrf_of(token) }))
}

/// Signs `name` in with `secret` when it is an active user with the Analyst role: a new session
/// that expires after `ttl`, whose token is returned (for the cookie); `Ok(Err(Busy))` when the
/// queue of password checks is full (never for a name and address with a pass: see [`Checks`]). The secret is checked with argon2 off the async threads,
/// against a dummy hash for an unknown name (the time does not tell which names exist).
pub async fn sign_in(
    pool: &PgPool,
    checks: &Checks,
    (name, passed): (&str, bool),
    secret: &str,
    ttl: Duration,
) -> Result<Result<Option<String>, Busy>> {
    let user: Option<(i64, String)> = sqlx::query_as(
        "select id, secret_hash from api_users where name = $1 and revoked_at is null and $2 = any(roles)",
    )
    .bind(name)
    .bind(users::ROLE_ANALYST)
    .fetch_optional(pool)
    .await
    .context("reading the user")?;
    let known = user.is_some();
    let (user_id, hash) = user.unwrap_or((0, crate::serve::auth::DUMMY_HASH.clone()));
    let ok = match checks.verify(secret, hash, passed).await {
        Ok(ok) => ok,
        Err(busy) => return Ok(Err(busy)),
    };
    if !(known && ok) {
        tracing::info!(user = name, "review desk: sign-in refused");
        return Ok(Ok(None));
    }
    let token = users::random_string(32);
    sqlx::query(
        "insert into review_sessions (token_sha256, user_id, expires_at) values ($1, $2, now() + $3::interval)",
    )
    .bind(&users::token_digest(&token)[..])
    .bind(user_id)
    .bind(chrono::Duration::from_std(ttl)?)
    .execute(pool)
    .await
    .context("recording the session")?;
    tracing::info!(user = name, "review desk: signed in");
    Ok(Ok(Some(token)))
}

/// A message for the next view of an event page, chosen by the server.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Flash {
    /// The event page it is for (0: the queue).
    pub event: i64,
    /// `msg` (done) or `error` (refused).
    pub kind: String,
    pub text: String,
    /// The decision just made, which the page offers to undo.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub undo: Option<Undo>,
}

/// A decision the next page offers to undo (reopen): the event and its decision as made.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Undo {
    pub event: i64,
    pub seen: String,
}

/// Leaves `flash` for the session of the request (replacing any other).
pub async fn set_flash(pool: &PgPool, headers: &HeaderMap, flash: &Flash) -> Result<()> {
    let Some(token) = cookie(headers, COOKIE) else { return Ok(()) };
    sqlx::query("update review_sessions set flash = $2, flash_at = now() where token_sha256 = $1")
        .bind(&users::token_digest(token)[..])
        .bind(sqlx::types::Json(flash))
        .execute(pool)
        .await
        .context("leaving a message for the next page")?;
    Ok(())
}

/// Takes the session's message for event `event`, if one was left in the last five minutes.
pub async fn take_flash(pool: &PgPool, headers: &HeaderMap, event: i64) -> Result<Option<Flash>> {
    let Some(token) = cookie(headers, COOKIE) else { return Ok(None) };
    let flash: Option<Option<sqlx::types::Json<Flash>>> = sqlx::query_scalar(
        "update review_sessions s set flash = null, flash_at = null
         from (select token_sha256, flash, flash_at from review_sessions where token_sha256 = $1 for update) old
         where s.token_sha256 = old.token_sha256 and (old.flash->>'event')::bigint = $2
         returning case when old.flash_at > now() - interval '5 minutes' then old.flash end",
    )
    .bind(&users::token_digest(token)[..])
    .bind(event)
    .fetch_optional(pool)
    .await
    .context("reading the page's message")?;
    Ok(flash.flatten().map(|f| f.0))
}

/// Ends the session whose token the request's cookie holds.
pub async fn sign_out(pool: &PgPool, headers: &HeaderMap) -> Result<()> {
    if let Some(token) = cookie(headers, COOKIE) {
        sqlx::query("delete from review_sessions where token_sha256 = $1")
            .bind(&users::token_digest(token)[..])
            .execute(pool)
            .await
            .context("ending the session")?;
    }
    Ok(())
}

/// Forgets sessions that expired (housekeeping).
pub async fn forget_expired(pool: &PgPool) -> Result<u64> {
    Ok(sqlx::query("delete from review_sessions where expires_at < now()").execute(pool).await?.rows_affected())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_are_found_by_name() {
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("a=1; callrecon_review=tok-en_1"));
        h.append(header::COOKIE, HeaderValue::from_static("callrecon_login=x"));
        assert_eq!(cookie(&h, COOKIE), Some("tok-en_1"));
        assert_eq!(cookie(&h, LOGIN_COOKIE), Some("x"));
        assert_eq!(cookie(&h, "b"), None);
    }

    #[test]
    fn csrf_tokens_belong_to_one_session() {
        let t = csrf_of("session-a");
        assert!(csrf_ok("session-a", &t));
        assert!(!csrf_ok("session-b", &t));
        assert!(!csrf_ok("session-a", ""));
        assert_ne!(t, URL_SAFE_NO_PAD.encode(users::token_digest("session-a")), "not the stored digest");
    }

    /// Issue 43: the sign-in form's token was derived from a cookie the client chooses, with no
    /// key of the server's.
    #[test]
    fn sign_in_tokens_need_the_installations_key() {
        let key = LoginKey(std::sync::Arc::new(vec![7; 32]));
        let token = key.csrf_of("nonce-a");
        assert!(key.csrf_ok("nonce-a", &token));
        assert!(!key.csrf_ok("nonce-b", &token));
        assert!(!key.csrf_ok("", &key.csrf_of("")));
        assert!(!key.csrf_ok("nonce-a", &csrf_of("nonce-a")), "the keyless derivation is refused");
        let other = LoginKey(std::sync::Arc::new(vec![8; 32]));
        assert!(!other.csrf_ok("nonce-a", &token));
    }

    #[test]
    fn posts_from_another_site_are_refused() {
        let check = |pairs: &[(&'static str, &'static str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.insert(*k, HeaderValue::from_static(v));
            }
            same_site(&h).is_ok()
        };
        assert!(check(&[]));
        assert!(check(&[("sec-fetch-site", "same-origin"), ("origin", "https://evil.example")]));
        assert!(!check(&[("sec-fetch-site", "cross-site")]));
        assert!(!check(&[("sec-fetch-site", "same-site")]));
        assert!(check(&[("host", "desk.example:8080"), ("origin", "http://desk.example:8080")]));
        assert!(check(&[("host", "Desk.Example"), ("origin", "https://desk.example")]));
        assert!(!check(&[("host", "desk.example"), ("origin", "https://evil.example")]));
        assert!(!check(&[("host", "desk.example"), ("origin", "null")]));
    }

    #[test]
    fn cookies_are_http_only_and_strict() {
        let c = set_cookie(COOKIE, "v", Duration::from_secs(60), true);
        let c = c.to_str().unwrap();
        assert!(c.contains("HttpOnly") && c.contains("SameSite=Strict") && c.contains("Secure"), "{c}");
        assert!(!set_cookie(COOKIE, "v", Duration::ZERO, false).to_str().unwrap().contains("Secure"));
    }
}
