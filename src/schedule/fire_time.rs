//! When a job fires: [`next_fire`], a pure function from a cron schedule, a time zone and an
//! instant to the next fire time. All the DST rules live here.
//!
//! # Fire times across DST changes
//! A schedule names wall-clock times in the job's time zone. Schedules that name their hours
//! (`0 30 2 * * *`) fire **once for each matching wall-clock time**:
//! - a time that occurs twice (fall-back) fires at its first occurrence only;
//! - a time that does not exist (spring-forward) fires at the moment the clock jumps (03:00 local
//!   on a New York spring-forward night), once however many skipped times the schedule had.
//!
//! Schedules that fire every hour (hour field `*`, e.g. `0 */15 * * * *`) **follow the clock**:
//! they fire at every instant whose local time matches, so they keep their real interval through
//! both changes (skipped local times do not exist, repeated ones fire twice). This is the rule of
//! Vixie cron, which operators know.

use chrono::{DateTime, Offset, TimeDelta, TimeZone, Timelike, Utc};
use chrono_tz::Tz;
use cron::TimeUnitSpec;

/// The largest jump of a clock at a DST (or time-zone) change that [`next_fire`] allows for.
/// Every zone in use today moves by one hour or less; some have moved by two.
const MAX_CLOCK_JUMP: TimeDelta = TimeDelta::hours(3);

/// The first fire time of `schedule` in `tz` strictly after `after`, by the DST rules of the
/// module documentation; `None` when the schedule never fires again.
pub fn next_fire(schedule: &cron::Schedule, tz: Tz, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let follows_clock = schedule.hours().count() == 24;
    let local = after.with_timezone(&tz).naive_local();
    // Candidates are walked in wall-clock order. The first occurrence of a wall time is a
    // non-decreasing function of it, so the first one after `after` ends the walk; the second
    // occurrences (fall-back, clock-following schedules only) lie up to one clock jump behind
    // `local` when a fall-back is just ahead, so the walk then starts that much earlier.
    let offset = |t: DateTime<Utc>| tz.offset_from_utc_datetime(&t.naive_utc()).fix().local_minus_utc();
    let fall_back_ahead = follows_clock && offset(after + MAX_CLOCK_JUMP) < offset(after);
    let start = if fall_back_ahead { local - MAX_CLOCK_JUMP } else { local };

    let mut best: Option<DateTime<Utc>> = None;
    // The cron crate walks wall-clock times; UTC stands for "no time zone" here.
    for wall in schedule.after(&start.and_utc()).map(|w| w.naive_utc()) {
        let (first, second) = match tz.from_local_datetime(&wall) {
            chrono::LocalResult::Single(t) => (Some(t), None),
            chrono::LocalResult::Ambiguous(earlier, later) => (Some(earlier), follows_clock.then_some(later)),
            chrono::LocalResult::None if follows_clock => (None, None),
            chrono::LocalResult::None => (end_of_gap(tz, wall), None),
        };
        if let Some(t) = second.map(|t| t.with_timezone(&Utc)).filter(|t| *t > after) {
            best = Some(best.map_or(t, |b| b.min(t)));
        }
        if let Some(t) = first.map(|t| t.with_timezone(&Utc)).filter(|t| *t > after) {
            return Some(best.map_or(t, |b| b.min(t)));
        }
    }
    best
}

/// The fire times after `after`, in order.
pub fn fire_times(schedule: &cron::Schedule, tz: Tz, after: DateTime<Utc>) -> impl Iterator<Item = DateTime<Utc>> {
    std::iter::successors(next_fire(schedule, tz, after), move |t| next_fire(schedule, tz, *t))
}

/// The instant a spring-forward gap holding `wall` ends: the first existing whole minute after
/// it (time-zone changes happen on whole minutes).
fn end_of_gap(tz: Tz, wall: chrono::NaiveDateTime) -> Option<DateTime<Tz>> {
    let mut minute = wall.with_second(0)?.with_nanosecond(0)?;
    // A gap is at most a day (Samoa skipped 30 December 2011).
    for _ in 0..=(2 * 24 * 60) {
        minute += TimeDelta::minutes(1);
        if let Some(t) = tz.from_local_datetime(&minute).earliest() {
            return Some(t);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use chrono::Datelike as _;
    use chrono_tz::America::New_York;
    use chrono_tz::Australia::Lord_Howe;
    use chrono_tz::Europe::London;

    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    /// The next `expected.len()` fire times of `schedule` in `tz` after `after`, as local times
    /// with their offsets (`2026-03-08T03:00:00-04:00`).
    fn check(schedule: &str, tz: Tz, after: &str, expected: &[&str]) {
        let cron = cron::Schedule::from_str(schedule).unwrap();
        let got: Vec<String> = fire_times(&cron, tz, t(after))
            .take(expected.len())
            .map(|f| f.with_timezone(&tz).to_rfc3339_opts(chrono::SecondsFormat::Secs, false))
            .collect();
        assert_eq!(got, expected, "{schedule} in {tz} after {after}");
    }

    // New York, 2026: spring-forward on 8 March (02:00 EST -> 03:00 EDT, at 07:00Z), fall-back on
    // 1 November (02:00 EDT -> 01:00 EST, at 06:00Z).

    #[test]
    fn skipped_time_fires_once_when_the_clock_jumps() {
        check(
            "0 30 2 * * *",
            New_York,
            "2026-03-07T08:00:00Z",
            &["2026-03-08T03:00:00-04:00", "2026-03-09T02:30:00-04:00"],
        );
        // Two skipped times (02:00, 02:30): still one fire, at the jump.
        check(
            "0 0,30 2 * * *",
            New_York,
            "2026-03-07T08:00:00Z",
            &["2026-03-08T03:00:00-04:00", "2026-03-09T02:00:00-04:00"],
        );
        check("0 0 2 * * *", New_York, "2026-03-08T06:59:59Z", &["2026-03-08T03:00:00-04:00"]);
        // London jumps from 01:00 GMT to 02:00 BST.
        check(
            "0 30 1 * * *",
            London,
            "2026-03-28T12:00:00Z",
            &["2026-03-29T02:00:00+01:00", "2026-03-30T01:30:00+01:00"],
        );
    }

    #[test]
    fn repeated_time_fires_once_at_its_first_occurrence() {
        check(
            "0 30 1 * * *",
            New_York,
            "2026-10-31T12:00:00Z",
            &["2026-11-01T01:30:00-04:00", "2026-11-02T01:30:00-05:00"],
        );
        // Started during the repeated hour, after the first 01:30: not again that night.
        check("0 30 1 * * *", New_York, "2026-11-01T06:10:00Z", &["2026-11-02T01:30:00-05:00"]);
        check(
            "0 0 2 * * *",
            New_York,
            "2026-10-31T12:00:00Z",
            &["2026-11-01T02:00:00-05:00", "2026-11-02T02:00:00-05:00"],
        );
        // Lord Howe Island moves by half an hour: 02:00 +11 -> 01:30 +10:30 on 5 April 2026.
        check(
            "0 45 1 * * *",
            Lord_Howe,
            "2026-04-04T00:00:00Z",
            &["2026-04-05T01:45:00+11:00", "2026-04-06T01:45:00+10:30"],
        );
    }

    #[test]
    fn hourly_schedules_follow_the_clock() {
        check(
            "0 0 * * * *",
            New_York,
            "2026-03-08T05:30:00Z",
            &["2026-03-08T01:00:00-05:00", "2026-03-08T03:00:00-04:00", "2026-03-08T04:00:00-04:00"],
        );
        check(
            "0 0 * * * *",
            New_York,
            "2026-11-01T04:30:00Z",
            &["2026-11-01T01:00:00-04:00", "2026-11-01T01:00:00-05:00", "2026-11-01T02:00:00-05:00"],
        );
        // From inside the first pass of the repeated hour, the second pass is next.
        check(
            "0 */20 * * * *",
            New_York,
            "2026-11-01T05:45:00Z",
            &["2026-11-01T01:00:00-05:00", "2026-11-01T01:20:00-05:00", "2026-11-01T01:40:00-05:00"],
        );
        check(
            "*/2 * * * * *",
            New_York,
            "2026-11-01T05:59:57Z",
            &["2026-11-01T01:59:58-04:00", "2026-11-01T01:00:00-05:00", "2026-11-01T01:00:02-05:00"],
        );
        check(
            "*/2 * * * * *",
            New_York,
            "2026-03-08T06:59:57Z",
            &["2026-03-08T01:59:58-05:00", "2026-03-08T03:00:00-04:00"],
        );
    }

    #[test]
    fn strictly_after_the_given_instant() {
        check("*/2 * * * * *", Tz::UTC, "2026-05-01T10:00:00Z", &["2026-05-01T10:00:02+00:00"]);
        check("*/2 * * * * *", Tz::UTC, "2026-05-01T10:00:00.5Z", &["2026-05-01T10:00:02+00:00"]);
        check("*/2 * * * * *", Tz::UTC, "2026-05-01T10:00:01.5Z", &["2026-05-01T10:00:02+00:00"]);
        check("0 0 2 * * *", Tz::UTC, "2026-05-01T02:00:00Z", &["2026-05-02T02:00:00+00:00"]);
    }

    #[test]
    fn a_daily_job_fires_once_on_every_day_of_a_year_with_both_changes() {
        for (schedule, tz) in [
            ("0 30 2 * * *", New_York),
            ("0 30 1 * * *", New_York),
            ("0 30 1 * * *", London),
            ("0 45 1 * * *", Lord_Howe),
        ] {
            let cron = cron::Schedule::from_str(schedule).unwrap();
            // The year 2026 as the job's time zone counts it, from its first midnight to the next year's.
            let midnight = |year| tz.with_ymd_and_hms(year, 1, 1, 0, 0, 0).single().unwrap().with_timezone(&Utc);
            let fires: Vec<_> = fire_times(&cron, tz, midnight(2026) - TimeDelta::seconds(1))
                .take_while(|f| *f < midnight(2027))
                .map(|f| f.with_timezone(&tz).date_naive())
                .collect();
            let every_day: Vec<_> = chrono::NaiveDate::from_ymd_opt(2026, 1, 1)
                .unwrap()
                .iter_days()
                .take_while(|d| d.year() == 2026)
                .collect();
            assert_eq!(every_day.len(), 365);
            assert_eq!(fires, every_day, "{schedule} in {tz}: not one fire on each day of 2026");
        }
    }

    #[test]
    fn sub_hourly_schedule_keeps_its_real_interval_through_both_changes() {
        let cron = cron::Schedule::from_str("0 */15 * * * *").unwrap();
        for (from, to) in
            [("2026-03-08T04:00:00Z", "2026-03-08T10:00:00Z"), ("2026-11-01T03:00:00Z", "2026-11-01T09:00:00Z")]
        {
            let fires: Vec<_> = fire_times(&cron, New_York, t(from)).take_while(|f| *f <= t(to)).collect();
            assert_eq!(fires.len(), 24, "{from}: {fires:?}");
            assert!(fires.windows(2).all(|w| w[1] - w[0] == TimeDelta::minutes(15)), "{from}: {fires:?}");
        }
    }
}
