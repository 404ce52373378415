//! How many connections and how long: [`Limits`], and the connections the open-file limit allows.

use std::time::Duration;

/// The limits of [`serve`](super::serve).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    pub shutdown_timeout: Duration,
}

impl Limits {
    /// A metrics endpoint's: scraped by a handful of clients.
    pub const METRICS: Limits = Limits {
        header_timeout: Duration::from_secs(30),
        body_timeout: Duration::from_secs(30),
        idle_timeout: Duration::from_secs(90),
        max_connections: 64,
        shutdown_timeout: Duration::from_secs(5),
    };

    /// Each timeout at most a day: a larger one (which `humantime` reads happily) would overflow
    /// the timers' instants.
    pub(super) fn bounded(self) -> Limits {
        let day = Duration::from_secs(86_400);
        Limits {
            header_timeout: self.header_timeout.min(day),
            body_timeout: self.body_timeout.min(day),
            idle_timeout: self.idle_timeout.min(day),
            max_connections: self.max_connections.max(1),
            shutdown_timeout: self.shutdown_timeout.min(day),
        }
    }
}

/// Connections answered 503 at once (past `max_connections`) while the next ones are dropped
/// unanswered: answering takes a moment (the request is read first, so closing does not reset
/// it), and those moments must not add up to unbounded file descriptors.
pub(super) const REFUSING: usize = 64;
/// Raises the soft limit on open files to the hard limit (systemd's default soft limit, 1024,
/// would otherwise cap the connections), and returns the limit now in force.
pub fn raise_open_file_limit() -> Option<u64> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return None;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    Some(limit.rlim_cur)
}

/// `max_connections` as the open-file limit allows: the connections, those being refused, and
/// `reserve` more (database connections, files, the listener) must fit under it.
pub fn connections_within(max_connections: usize, open_files: Option<u64>, reserve: usize) -> usize {
    let Some(files) = open_files else { return max_connections };
    let room = usize::try_from(files).unwrap_or(usize::MAX).saturating_sub(REFUSING + reserve).max(1);
    if room < max_connections {
        tracing::warn!(
            max_connections,
            open_files = files,
            allowed = room,
            "--max-connections is more than the open-file limit allows; raise the hard limit (LimitNOFILE=) to serve that many"
        );
    }
    max_connections.min(room)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connections_fit_under_the_open_file_limit() {
        assert_eq!(connections_within(1000, None, 100), 1000);
        assert_eq!(connections_within(1000, Some(1_000_000), 100), 1000);
        assert_eq!(connections_within(1000, Some(1024), 100), 1024 - REFUSING - 100);
        assert_eq!(connections_within(1000, Some(10), 100), 1);
    }
}
