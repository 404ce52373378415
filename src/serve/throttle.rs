//! Wrong secrets, throttled: the token endpoint and the desk's sign-in check secrets with
//! argon2 (tens of milliseconds and ~19 MiB each), so a client guessing secrets, or only
//! flooding, would otherwise cost a full check per request and delay everyone's.
//!
//! - [`Throttle`]: per client address (an IPv6 address by its /64) and per user name, the first
//!   [`FREE`] wrong secrets cost nothing more; each further one doubles a wait (1 s, 2 s, 4 s, …
//!   up to [`LONGEST`]) during which that address or name is answered 429 with `Retry-After`
//!   without any check. A failure is forgotten [`FORGET`] after the last one. A right secret
//!   clears the name's count, and its (name, address) pair passes both waits for a day, so a
//!   flood under someone's name or from their network does not lock out a client that has
//!   signed in from its address before (a wrong secret from that pair ends the pass). A 429 is
//!   sent after a pause ([`PAUSE`], or the wait if shorter): a client flooding as fast as it is
//!   answered then costs the server a few requests a second instead of thousands.
//! - [`Checks`]: the argon2 checks themselves, in two lanes of one check at a time each: clients
//!   whose (name, address) pair has a pass in one (they wait their turn, never refused), all
//!   others in the other, with at most [`QUEUED`] waiting; past that a request is answered 503
//!   (after the same pause as a 429) rather than queued behind the flood. So a flood of unknown
//!   clients keeps at most one core checking secrets, and a known client waits for no check of
//!   theirs.
//!
//! State is in memory, per `serve` process, bounded to [`MAX_KEYS`] addresses and names.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::sync::Semaphore;

use crate::metrics::Labels;

/// Wrong secrets before the waits begin.
pub const FREE: u32 = 5;
/// The first wait; each further wrong secret doubles it.
const FIRST: Duration = Duration::from_secs(1);
/// The longest wait.
pub const LONGEST: Duration = Duration::from_secs(15 * 60);
/// A count of wrong secrets is forgotten this long after the last one.
const FORGET: Duration = Duration::from_secs(30 * 60);
/// A right secret lets its (name, address) pair pass the waits this long.
const PASS: Duration = Duration::from_secs(24 * 3600);
/// Addresses, names and passes remembered at most (each); the oldest are forgotten first.
pub const MAX_KEYS: usize = 100_000;
/// How long a throttled request is held before its 429, at most.
pub const PAUSE: Duration = Duration::from_millis(500);
/// Password checks of unknown clients run at once (argon2 is CPU-bound); known clients have a
/// lane of one check of their own.
const RUNNING: usize = 1;
/// Password checks of unknown clients waiting at most; past that, 503.
pub const QUEUED: usize = 4;

/// What a throttle counts a failure against.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Address(IpAddr),
    Name(String),
}

#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    last: Instant,
}

impl Failures {
    /// Until when requests are refused, if they are.
    fn wait_until(&self) -> Option<Instant> {
        let over = self.count.checked_sub(FREE).filter(|n| *n > 0)?;
        let wait = FIRST.checked_mul(1u32.checked_shl(over - 1).unwrap_or(u32::MAX)).unwrap_or(LONGEST).min(LONGEST);
        Some(self.last + wait)
    }
}

/// Refused for now: retry after this long; `by` says which count refused it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Throttled {
    pub retry_after: Duration,
    pub by: &'static str,
}

impl Throttled {
    /// `Retry-After`, in whole seconds (at least one).
    pub fn retry_after_secs(&self) -> u64 {
        self.retry_after.as_secs() + u64::from(self.retry_after.subsec_nanos() > 0)
    }

    /// Holds the request a moment before its 429 ([`PAUSE`] at most, never past the wait).
    pub async fn pause(&self) {
        tokio::time::sleep(self.retry_after.min(PAUSE)).await;
    }
}

#[derive(Default)]
struct State {
    failures: HashMap<Key, Failures>,
    passes: HashMap<(String, IpAddr), Instant>,
}

/// The throttle of one endpoint (`token` or `sign_in`), its counts in `/metrics`.
#[derive(Clone)]
pub struct Throttle {
    endpoint: &'static str,
    state: Arc<Mutex<State>>,
    metrics: AuthMetrics,
}

/// `callrecon_auth_failures_total`, `callrecon_auth_throttled_total`,
/// `callrecon_auth_checks_refused_total`, by endpoint.
#[derive(Clone, Default)]
pub struct AuthMetrics {
    pub failures: Family<Labels, Counter>,
    pub throttled: Family<Labels, Counter>,
    pub refused: Family<Labels, Counter>,
}

impl AuthMetrics {
    pub fn register(registry: &mut prometheus_client::registry::Registry) -> AuthMetrics {
        let m = AuthMetrics::default();
        registry.register(
            "callrecon_auth_failures",
            "Wrong secrets (and unknown names) at the token endpoint and the desk's sign-in",
            m.failures.clone(),
        );
        registry.register(
            "callrecon_auth_throttled",
            "Requests answered 429 after repeated wrong secrets, by endpoint and by what refused them (address or name)",
            m.throttled.clone(),
        );
        registry.register(
            "callrecon_auth_checks_refused",
            "Requests answered 503 because the queue of password checks was full",
            m.refused.clone(),
        );
        m
    }
}

/// An address as the throttle counts it: IPv6 by its /64 (one host's block), IPv4 as is.
fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
        v4 => v4,
    }
}

/// A name as the throttle counts it (bounded: a megabyte of name is one key of 200 characters).
fn name_key(name: &str) -> String {
    name.trim().chars().take(200).collect()
}

impl Throttle {
    pub fn new(endpoint: &'static str, metrics: AuthMetrics) -> Throttle {
        Throttle { endpoint, state: Arc::default(), metrics }
    }

    fn labels(&self, by: &'static str) -> Labels {
        let mut labels = vec![("endpoint", self.endpoint.to_owned())];
        if !by.is_empty() {
            labels.push(("by", by.to_owned()));
        }
        labels
    }

    /// Whether a secret for `name` from `ip` may be checked now: `Ok(true)` when the pair has
    /// a pass (it authenticated from there within a day), `Ok(false)` for others.
    pub fn check(&self, ip: IpAddr, name: &str) -> Result<bool, Throttled> {
        let (ip, name) = (address_key(ip), name_key(name));
        let now = Instant::now();
        let state = self.state.lock().expect("not poisoned");
        if state.passes.get(&(name.clone(), ip)).is_some_and(|at| now.duration_since(*at) < PASS) {
            return Ok(true);
        }
        for (key, by) in [(Key::Address(ip), "address"), (Key::Name(name), "name")] {
            let until = state.failures.get(&key).and_then(Failures::wait_until);
            if let Some(until) = until.filter(|u| *u > now) {
                self.metrics.throttled.get_or_create(&self.labels(by)).inc();
                return Err(Throttled { retry_after: until - now, by });
            }
        }
        Ok(false)
    }

    /// A wrong secret (or unknown name) for `name` from `ip`.
    pub fn failed(&self, ip: IpAddr, name: &str) {
        let (ip, name) = (address_key(ip), name_key(name));
        let now = Instant::now();
        self.metrics.failures.get_or_create(&self.labels("")).inc();
        let mut state = self.state.lock().expect("not poisoned");
        state.passes.remove(&(name.clone(), ip));
        for key in [Key::Address(ip), Key::Name(name)] {
            let f = state.failures.entry(key).or_insert(Failures { count: 0, last: now });
            if now.duration_since(f.last) >= FORGET {
                f.count = 0;
            }
            f.count = f.count.saturating_add(1);
            f.last = now;
        }
        if state.failures.len() > MAX_KEYS {
            forget_oldest(&mut state.failures, |f| f.last);
        }
    }

    /// The right secret for `name` from `ip`.
    pub fn succeeded(&self, ip: IpAddr, name: &str) {
        let (ip, name) = (address_key(ip), name_key(name));
        let mut state = self.state.lock().expect("not poisoned");
        state.failures.remove(&Key::Name(name.clone()));
        state.passes.insert((name, ip), Instant::now());
        if state.passes.len() > MAX_KEYS {
            forget_oldest(&mut state.passes, |at| *at);
        }
    }
}

/// Forgets the older half of `map` by `at`: a flood of new keys costs one sort per
/// `MAX_KEYS / 2` keys, and memory stays bounded.
fn forget_oldest<K: Clone + Eq + std::hash::Hash, V>(map: &mut HashMap<K, V>, at: impl Fn(&V) -> Instant) {
    let mut times: Vec<Instant> = map.values().map(&at).collect();
    let middle = times.len() / 2;
    let (_, cut, _) = times.select_nth_unstable(middle);
    let cut = *cut;
    map.retain(|_, v| at(v) >= cut);
}

/// The client's address: the peer's, or, when the peer is one of the `trusted` proxies, the
/// last address of `X-Forwarded-For` that is not one of them (proxies append the address they
/// received from; what the client wrote itself comes first and is not believed).
pub fn client_address(peer: IpAddr, headers: &axum::http::HeaderMap, trusted: &[IpAddr]) -> IpAddr {
    if !trusted.contains(&peer) {
        return peer;
    }
    let forwarded: Vec<IpAddr> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|a| a.trim().parse().ok())
        .collect();
    forwarded.into_iter().rev().find(|a| !trusted.contains(a)).unwrap_or(peer)
}

/// The password checks: [`RUNNING`] at once on blocking threads for unknown clients, with
/// [`QUEUED`] waiting at most, and one at a time for known ones.
#[derive(Clone)]
pub struct Checks {
    running: Arc<Semaphore>,
    known: Arc<Semaphore>,
    waiting: Arc<AtomicUsize>,
    queued: usize,
}

/// The queue of password checks is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Busy;

impl Default for Checks {
    fn default() -> Self {
        Checks::new(RUNNING, QUEUED)
    }
}

impl Checks {
    pub fn new(running: usize, queued: usize) -> Checks {
        Checks {
            running: Arc::new(Semaphore::new(running)),
            known: Arc::new(Semaphore::new(1)),
            waiting: Arc::default(),
            queued,
        }
    }

    /// Whether `secret` matches `hash`, checked in turn, or [`Busy`] when too many wait (never
    /// for a `known` client: one whose name and address have a pass).
    pub async fn verify(&self, secret: &str, hash: String, known: bool) -> Result<bool, Busy> {
        let permit = match self.running.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) if known => self.known.clone().acquire_owned().await.expect("the semaphore is never closed"),
            Err(_) => {
                if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.queued {
                    self.waiting.fetch_sub(1, Ordering::AcqRel);
                    tokio::time::sleep(PAUSE).await;
                    return Err(Busy);
                }
                let permit = self.running.clone().acquire_owned().await;
                self.waiting.fetch_sub(1, Ordering::AcqRel);
                permit.expect("the semaphore is never closed")
            }
        };
        let secret = secret.to_owned();
        let checked = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            crate::users::verify_secret(&secret, &hash)
        })
        .await;
        // A panicking check is a failed one.
        Ok(checked.unwrap_or(false))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn throttle() -> Throttle {
        Throttle::new("token", AuthMetrics::default())
    }

    #[test]
    fn waits_double_after_the_free_failures() {
        let at = Instant::now();
        let wait = |count| Failures { count, last: at }.wait_until().map(|u| u - at);
        assert_eq!(wait(FREE), None);
        assert_eq!(wait(FREE + 1), Some(Duration::from_secs(1)));
        assert_eq!(wait(FREE + 2), Some(Duration::from_secs(2)));
        assert_eq!(wait(FREE + 4), Some(Duration::from_secs(8)));
        assert_eq!(wait(FREE + 20), Some(LONGEST));
        assert_eq!(wait(u32::MAX), Some(LONGEST));
    }

    #[test]
    fn an_address_is_refused_after_the_free_failures_and_a_known_pair_passes() {
        let t = throttle();
        let (attacker, home): (IpAddr, IpAddr) = ("10.0.0.9".parse().unwrap(), "10.0.0.1".parse().unwrap());
        t.succeeded(home, "acme");
        for i in 0..FREE {
            assert_eq!(t.check(attacker, &format!("guess-{i}")), Ok(false));
            t.failed(attacker, &format!("guess-{i}"));
        }
        t.failed(attacker, "acme");
        let refused = t.check(attacker, "other").unwrap_err();
        assert_eq!(refused.by, "address");
        assert_eq!(refused.retry_after_secs(), 1);
        // Another address is not refused, and neither is the name's known pair.
        assert_eq!(t.check(home, "other"), Ok(false));
        for _ in 0..FREE + 3 {
            t.failed("10.0.0.7".parse().unwrap(), "acme");
        }
        assert_eq!(t.check("10.0.0.8".parse().unwrap(), "acme").unwrap_err().by, "name");
        assert_eq!(t.check(home, "acme"), Ok(true));
    }

    #[test]
    fn ipv6_addresses_count_by_their_64_prefix() {
        let t = throttle();
        for i in 0..=FREE {
            t.failed(format!("2001:db8::{i}").parse().unwrap(), "x");
        }
        assert!(t.check("2001:db8::ffff".parse().unwrap(), "y").is_err());
        assert!(t.check("2001:db8:0:1::1".parse().unwrap(), "y").is_ok());
    }

    #[test]
    fn the_client_address_is_read_from_trusted_proxies_only() {
        let mut h = axum::http::HeaderMap::new();
        h.append("x-forwarded-for", "6.6.6.6, 203.0.113.7".parse().unwrap());
        h.append("x-forwarded-for", "10.0.0.2".parse().unwrap());
        let (proxy, inner): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        assert_eq!(client_address(proxy, &h, &[]), proxy);
        assert_eq!(client_address(proxy, &h, &[proxy]), inner);
        assert_eq!(client_address(proxy, &h, &[proxy, inner]), "203.0.113.7".parse::<IpAddr>().unwrap());
        assert_eq!(client_address(proxy, &axum::http::HeaderMap::new(), &[proxy]), proxy);
    }

    #[test]
    fn memory_is_bounded() {
        let t = throttle();
        for i in 0..(MAX_KEYS as u32 + 10) {
            t.failed(IpAddr::from(i.to_be_bytes()), "n");
        }
        assert!(t.state.lock().unwrap().failures.len() <= MAX_KEYS);
    }

    #[tokio::test]
    async fn checks_past_the_queue_are_refused() {
        let checks = Checks::new(1, 1);
        let hash = crate::users::hash_secret("s").unwrap();
        let (a, b, c, known) = tokio::join!(
            checks.verify("s", hash.clone(), false),
            checks.verify("x", hash.clone(), false),
            checks.verify("s", hash.clone(), false),
            checks.verify("s", hash, true)
        );
        assert_eq!((a, b, c, known), (Ok(true), Ok(false), Err(Busy), Ok(true)), "a known client waits its turn");
    }
}
