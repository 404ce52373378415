//! Users of the intake API and the review desk (`callrecon users add|list|revoke`) and their
//! credentials.
//!
//! A user has a client id and a secret (OAuth2 client credentials) and roles: a system posting
//! events (`AsyncMetaData`) uses the client id, an analyst (`Analyst`, a person) signs in to the
//! review desk with the user's name and secret. Secrets are shown
//! once, when the user is created, and stored as argon2id hashes; access tokens are stored as
//! sha256 digests (they are 32 random bytes, so a fast hash is enough).

use std::fmt::Write as _;

use anyhow::{Context, Result, bail};
use argon2::{Argon2, PasswordHasher as _, PasswordVerifier as _};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use sha2::{Digest as _, Sha256};
use sqlx::PgPool;

/// The role that may post events to `/callevent/v1/outofband/event`.
pub const ROLE_ASYNC_METADATA: &str = "AsyncMetaData";
/// The role that may sign in to the review desk (`/review`) and decide events there.
pub const ROLE_ANALYST: &str = "Analyst";
/// Every role a user can be given (`users add --role`).
pub const ROLES: &[&str] = &[ROLE_ASYNC_METADATA, ROLE_ANALYST];

/// A user just created: the only time its secret exists in clear.
#[derive(Debug)]
pub struct Created {
    pub name: String,
    pub client_id: String,
    pub client_secret: String,
    pub roles: Vec<String>,
}

/// A row of `users list`.
#[derive(Debug, sqlx::FromRow)]
pub struct User {
    pub name: String,
    pub client_id: String,
    pub roles: Vec<String>,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub active_tokens: i64,
}

/// Creates a user with a fresh client id and secret.
pub async fn add(pool: &PgPool, name: &str, roles: &[String]) -> Result<Created> {
    check_name(name)?;
    let mut roles = roles.to_vec();
    roles.sort();
    roles.dedup();
    if let Some(unknown) = roles.iter().find(|r| !ROLES.contains(&r.as_str())) {
        bail!("unknown role {unknown:?}; roles are: {}", ROLES.join(", "));
    }
    let client_id = format!("cr-{}", random_string(12));
    let client_secret = random_string(32);
    let secret_hash = hash_secret(&client_secret)?;
    let inserted = sqlx::query("insert into api_users (name, client_id, secret_hash, roles) values ($1, $2, $3, $4)")
        .bind(name)
        .bind(&client_id)
        .bind(&secret_hash)
        .bind(&roles)
        .execute(pool)
        .await;
    match inserted {
        Ok(_) => Ok(Created { name: name.to_owned(), client_id, client_secret, roles }),
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
            bail!(
                "an active API user named {name:?} already exists (`callrecon users list`; revoke it first to reuse the name)"
            )
        }
        Err(e) => Err(e).context("creating the API user"),
    }
}

/// Every user, active ones first, then by name.
pub async fn list(pool: &PgPool) -> Result<Vec<User>> {
    sqlx::query_as(
        "select u.name, u.client_id, u.roles, u.created_at, u.revoked_at,
                (select count(*) from api_tokens t where t.user_id = u.id and t.expires_at > now()) as active_tokens
         from api_users u
         order by u.revoked_at is not null, u.name, u.id",
    )
    .fetch_all(pool)
    .await
    .context("listing API users")
}

/// Revokes the active user `name`: its secret and every token it holds stop working at once.
pub async fn revoke(pool: &PgPool, name: &str) -> Result<()> {
    let mut tx = pool.begin().await?;
    let id: Option<i64> = sqlx::query_scalar(
        "update api_users set revoked_at = now() where name = $1 and revoked_at is null returning id",
    )
    .bind(name)
    .fetch_optional(&mut *tx)
    .await
    .context("revoking the API user")?;
    let Some(id) = id else {
        bail!("no active API user named {name:?} (`callrecon users list` shows them)");
    };
    sqlx::query("delete from api_tokens where user_id = $1").bind(id).execute(&mut *tx).await?;
    sqlx::query("delete from review_sessions where user_id = $1").bind(id).execute(&mut *tx).await?;
    tx.commit().await.context("revoking the API user")?;
    Ok(())
}

/// What `users add` prints: the credentials, once, and how to use them.
pub fn created_text(c: &Created) -> String {
    let roles = if c.roles.is_empty() { "no roles".to_owned() } else { format!("role {}", c.roles.join(", ")) };
    let mut s = format!("created API user {} ({roles})\n", c.name);
    let _ = writeln!(s, "client_id:     {}", c.client_id);
    let _ = writeln!(s, "client_secret: {}", c.client_secret);
    s.push_str("The secret is shown only now and stored hashed: hand it over securely.\n");
    if c.roles.iter().any(|r| r == ROLE_ANALYST) {
        let _ = writeln!(
            s,
            "{} signs in to the review desk (/review/login) with the name {} and this secret.",
            c.name, c.name
        );
    }
    if !c.roles.iter().any(|r| r == ROLE_ASYNC_METADATA) {
        let _ = writeln!(s, "Without the {ROLE_ASYNC_METADATA} role this user cannot post events.");
    }
    s
}

/// What `users list` prints.
pub fn list_text(users: &[User]) -> String {
    if users.is_empty() {
        return "no API users (create one with `callrecon users add NAME --role AsyncMetaData`)\n".to_owned();
    }
    let mut s =
        format!("{:<20} {:<20} {:<16} {:<20} {:>6}  {}\n", "NAME", "CLIENT ID", "ROLES", "CREATED", "TOKENS", "STATUS");
    for u in users {
        let status = match u.revoked_at {
            Some(t) => format!("revoked {}", t.format("%Y-%m-%d %H:%M")),
            None => "active".to_owned(),
        };
        let roles = if u.roles.is_empty() { "-".to_owned() } else { u.roles.join(",") };
        let _ = writeln!(
            s,
            "{:<20} {:<20} {:<16} {:<20} {:>6}  {status}",
            u.name,
            u.client_id,
            roles,
            u.created_at.format("%Y-%m-%d %H:%M"),
            u.active_tokens
        );
    }
    s
}

fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@'));
    if !ok {
        bail!("invalid user name {name:?}: use 1 to 64 letters, digits, `-`, `_`, `.` or `@`");
    }
    Ok(())
}

/// `n` random bytes (from the OS), base64url without padding.
pub fn random_string(n: usize) -> String {
    let mut bytes = vec![0u8; n];
    getrandom::fill(&mut bytes).expect("the OS random number generator");
    URL_SAFE_NO_PAD.encode(bytes)
}

/// An argon2id hash of a secret (PHC string with its own random salt).
pub fn hash_secret(secret: &str) -> Result<String> {
    let hash =
        Argon2::default().hash_password(secret.as_bytes()).map_err(|e| anyhow::anyhow!("hashing the secret: {e}"))?;
    Ok(hash.to_string())
}

/// Whether `secret` matches a hash made by [`hash_secret`]. Slow on purpose (argon2).
pub fn verify_secret(secret: &str, hash: &str) -> bool {
    Argon2::default().verify_password(secret.as_bytes(), hash).is_ok()
}

/// The digest an access token is stored and looked up by.
pub fn token_digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_verify_only_against_their_hash() {
        let hash = hash_secret("s3cret").unwrap();
        assert!(hash.starts_with("$argon2id$"), "{hash}");
        assert!(!hash.contains("s3cret"));
        assert!(verify_secret("s3cret", &hash));
        assert!(!verify_secret("s3cres", &hash));
        assert!(!verify_secret("s3cret", "not a hash"));
        // Salted: the same secret hashes differently each time.
        assert_ne!(hash, hash_secret("s3cret").unwrap());
    }

    #[test]
    fn random_strings_are_url_safe_and_distinct() {
        let a = random_string(32);
        assert_eq!(a.len(), 43);
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'), "{a}");
        assert_ne!(a, random_string(32));
    }

    #[test]
    fn user_names_are_checked() {
        for ok in ["acme", "acme-prod_2", "ops@acme.example"] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a b", "acme;drop", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }
}
