//! Analysts' sign-in: the session cookie, its row in `review_sessions`, and the CSRF token of
//! every form.
//!
//! The session token (32 random bytes) lives only in the analyst's cookie (HttpOnly,
//! SameSite=Strict, `Secure` with `--secure-cookies`, path `/review`); the table keeps its sha256
//! digest, with the time it expires. A form's CSRF token is derived from the session token
//! (sha256 of it with a label), so it is checked without being stored, differs from what the
//! table holds, and cannot be made by a page that cannot read the cookie. The sign-in form,
//! before there is a session, is protected the same way by a cookie of its own.

use std::time::Duration;

use anyhow::{Context, Result};
use axum::http::{HeaderMap, HeaderValue, header};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest as _, Sha256};
use sqlx::PgPool;

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
/// that expires after `ttl`, whose token is returned (for the cookie). The secret is checked
/// with argon2 off the async threads, against a dummy hash for an unknown name (the time does
/// not tell which names exist).
pub async fn sign_in(
    pool: &PgPool,
    verifications: &tokio::sync::Semaphore,
    name: &str,
    secret: &str,
    ttl: Duration,
) -> Result<Option<String>> {
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
    let secret = secret.to_owned();
    // Bounded like the token endpoint's: each verification takes tens of ms and ~19 MiB.
    let _permit = verifications.acquire().await?;
    let ok = tokio::task::spawn_blocking(move || users::verify_secret(&secret, &hash)).await?;
    if !(known && ok) {
        tracing::info!(user = name, "review desk: sign-in refused");
        return Ok(None);
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
    Ok(Some(token))
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

    #[test]
    fn cookies_are_http_only_and_strict() {
        let c = set_cookie(COOKIE, "v", Duration::from_secs(60), true);
        let c = c.to_str().unwrap();
        assert!(c.contains("HttpOnly") && c.contains("SameSite=Strict") && c.contains("Secure"), "{c}");
        assert!(!set_cookie(COOKIE, "v", Duration::ZERO, false).to_str().unwrap().contains("Secure"));
    }
}
