//! Cron schedules: parse a function's `schedule` and `timezone`, and compute
//! when it fires.
//!
//! Pure: no clock and no I/O. Callers pass the instants ("now", "the last
//! fire"), so every rule below is unit-tested on fixed dates.
//!
//! # Syntax
//!
//! - **5 fields**, standard cron: `minute hour day-of-month month day-of-week`,
//!   firing at second 0.
//! - **6 fields**: the same with `second` first (`0 30 2 * * *`).
//! - Each field is a comma-separated list of items; an item is `*`, a value
//!   `n`, a range `a-b`, optionally followed by a step `/s` (`*/15`, `8-18/2`;
//!   `a/s` means `a-max/s`). Day-of-month and day-of-week also take `?` for
//!   "any". Ranges do not wrap around (`22-2` is an error; write `22-23,0-2`).
//! - Months take `JAN`..`DEC`, days of the week `SUN`..`SAT` (three letters,
//!   any case). Day-of-week numbers are 0-7 with both 0 and 7 meaning
//!   Sunday; a range may end at `7`/`SUN` (`FRI-SUN`, `5-7`); `*/2` and `a/s`
//!   step over 0-6.
//! - When day-of-month and day-of-week are **both** restricted, a day matches
//!   if **either** matches (`0 0 13 * FRI` is every 13th and every Friday), as
//!   in Vixie cron and robfig/cron (Kubernetes CronJob, OpenFaaS). A field is
//!   unrestricted only when it is exactly `*` or `?` (or `*/1`).
//! - Macros: `@yearly`/`@annually` (`0 0 1 1 *`), `@monthly` (`0 0 1 * *`),
//!   `@weekly` (`0 0 * * 0`), `@daily`/`@midnight` (`0 0 * * *`), `@hourly`
//!   (`0 * * * *`).
//! - `@every D`: `D` is a sequence of whole numbers with units `h`, `m`, `s`,
//!   `ms` (`30s`, `5m`, `1h30m`, `1500ms`), at least 1 s. It ticks at every
//!   multiple of `D` since the Unix epoch, so every replica agrees without
//!   sharing state; the time zone plays no part.
//!
//! Cron expressions are evaluated in the schedule's IANA `timezone` (wall
//! clock), between 1970 and 2100 (the range of the `cron` crate; after that
//! [`Schedule::next_after`] returns `None`).
//!
//! # Daylight saving time
//!
//! The fields match *wall-clock* times; where the clock skips or repeats, the
//! schedule falls into one of two kinds:
//!
//! - A schedule whose **hour field covers all 24 hours** (`*/15 * * * *`,
//!   `5 * * * *`, `@hourly`, `*/10 * * * * *`) *repeats within the hour* and
//!   **follows real elapsed time**: it fires at every real instant whose wall
//!   clock matches. In a repeated hour (fall back) it fires in both
//!   occurrences; wall times skipped by a gap (spring forward) never happen, so
//!   they do not fire. `*/15 * * * *` thus fires every 15 real minutes straight
//!   through both transitions, and `5 * * * *` every 60 real minutes.
//! - Any other schedule has **fixed hours** (`30 2 * * *`, `*/15 2 * * *`,
//!   `0 */2 * * *`, `@daily`): each matching wall time fires **once**, at the
//!   first instant the wall clock reaches it. A time that exists twice fires
//!   at its first occurrence only; a time that does not exist that day fires at
//!   the first instant after the gap, and several skipped times (or a skipped
//!   time and the real time right after the gap) fire there only once.
//!
//! Example, Europe/Berlin 2026: on 29 March the clock jumps 02:00 → 03:00, so
//! `30 2 * * *` fires at 03:00 CEST (01:00 UTC); on 25 October it falls back
//! 03:00 → 02:00, so `30 2 * * *` fires at 02:30 CEST (00:30 UTC) only, while
//! `*/15 * * * *` fires at 02:00, 02:15, 02:30, 02:45 CEST and again at 02:00,
//! 02:15, 02:30, 02:45 CET.
//!
//! Field expressions are evaluated by the `cron` crate. Its dialect
//! differs from standard cron, so this module validates the standard syntax
//! itself and translates: seconds are always given, day-of-week goes over as
//! names (the crate numbers Sunday 1 to Saturday 7, not 0/7 to 6), and the
//! day-of-month/day-of-week "either" rule is two crate schedules whose fire
//! times are merged (the crate requires both). Iteration happens in naive
//! wall-clock time (the crate sees it as UTC) and this module maps each
//! wall time to real instants, because the crate's own zone handling silently
//! skips times in a gap and fires repeated times twice.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use ::cron::TimeUnitSpec;
use chrono::{DateTime, LocalResult, NaiveDateTime, Offset, TimeDelta, TimeZone, Utc};
use chrono_tz::Tz;

/// What a schedule may look like, for error messages.
const EXPECTED: &str = "expected 5 fields (minute hour day-of-month month day-of-week), \
6 with seconds first, @every 30s, or @hourly/@daily/@weekly/@monthly/@yearly";

/// What `@every` takes, for error messages.
const EVERY_EXPECTED: &str =
    "@every needs a duration such as 30s, 5m, 1h or 1h30m (whole numbers with units h, m, s, ms)";

/// A `schedule` or `timezone` that cannot be used. The message names the key
/// and its value and says what was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    /// The `schedule` expression is malformed.
    #[error("schedule {expr:?}: {reason}")]
    Schedule { expr: String, reason: String },
    /// The `timezone` is not an IANA zone name.
    #[error("timezone {zone:?}: not an IANA time zone such as Europe/Berlin")]
    Timezone { zone: String },
}

impl ScheduleError {
    /// The function key at fault: `schedule` or `timezone`.
    pub fn key(&self) -> &'static str {
        match self {
            Self::Schedule { .. } => "schedule",
            Self::Timezone { .. } => "timezone",
        }
    }
}

/// A parsed schedule in its time zone. See the [module](self) docs for the
/// syntax and the daylight-saving rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    expr: String,
    zone: Tz,
    kind: Kind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    /// `@every`: the period in nanoseconds (at least 1 s).
    Every { period_nanos: i128 },
    /// A cron expression.
    Cron(Cron),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Cron {
    /// The crate schedules whose matches are merged: one, or two when
    /// day-of-month and day-of-week are both restricted (either may match).
    parts: Vec<::cron::Schedule>,
    /// The hour field covers every hour: follow real elapsed time across DST
    /// changes instead of firing each wall time once.
    elapsed: bool,
}

impl Schedule {
    /// Parses `expr` (the `schedule` key) in `timezone` (the `timezone` key,
    /// an IANA name such as `Europe/Berlin` or `UTC`; callers pass `UTC` when
    /// the key is absent).
    pub fn parse(expr: &str, timezone: &str) -> Result<Schedule, ScheduleError> {
        let kind = parse_kind(expr).map_err(|reason| ScheduleError::Schedule {
            expr: expr.to_owned(),
            reason,
        })?;
        let zone = Tz::from_str(timezone.trim()).map_err(|_| ScheduleError::Timezone {
            zone: timezone.to_owned(),
        })?;
        Ok(Schedule {
            expr: expr.to_owned(),
            zone,
            kind,
        })
    }

    /// The expression as given.
    pub fn expression(&self) -> &str {
        &self.expr
    }

    /// The time zone the expression is evaluated in.
    pub fn timezone(&self) -> Tz {
        self.zone
    }

    /// Whether the schedule follows real elapsed time across DST changes
    /// (`@every`, and cron expressions whose hour field covers every hour)
    /// rather than firing each matching wall time once.
    pub fn follows_elapsed_time(&self) -> bool {
        match &self.kind {
            Kind::Every { .. } => true,
            Kind::Cron(cron) => cron.elapsed,
        }
    }

    /// The first scheduled instant strictly after `after`, or `None` when
    /// there is none (a date that never occurs, such as `0 0 30 2 *`, or
    /// beyond the year 2100).
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match &self.kind {
            Kind::Every { period_nanos } => every_next_after(*period_nanos, after),
            Kind::Cron(cron) => cron.next_after(self.zone, after),
        }
    }

    /// The scheduled instants in `(from, to]` — strictly after `from`, at or
    /// before `to` — in order, at most `limit` of them (the earliest ones).
    /// With `from` the last fire and `to` now, these are the ticks due since.
    pub fn fires_between(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        limit: usize,
    ) -> Vec<DateTime<Utc>> {
        let mut out = Vec::new();
        let mut cursor = from;
        while out.len() < limit {
            match self.next_after(cursor) {
                Some(next) if next <= to => {
                    out.push(next);
                    cursor = next;
                }
                _ => break,
            }
        }
        out
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.expr, self.zone.name())
    }
}

// ---------------------------------------------------------------------------
// Computing fire times.

/// The next multiple of `period` nanoseconds since the epoch after `after`.
fn every_next_after(period: i128, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
    const NANOS: i128 = 1_000_000_000;
    let after = i128::from(after.timestamp()) * NANOS + i128::from(after.timestamp_subsec_nanos());
    let next = after
        .div_euclid(period)
        .checked_add(1)?
        .checked_mul(period)?;
    let secs = i64::try_from(next.div_euclid(NANOS)).ok()?;
    let nanos = u32::try_from(next.rem_euclid(NANOS)).ok()?;
    DateTime::from_timestamp(secs, nanos)
}

impl Cron {
    /// The first matching wall-clock time strictly after `wall` (whole
    /// seconds), merged over the parts.
    fn next_wall(&self, wall: NaiveDateTime) -> Option<NaiveDateTime> {
        let wall = wall.and_utc();
        self.parts
            .iter()
            .filter_map(|part| part.after(&wall).next())
            .min()
            .map(|t| t.naive_utc())
    }

    /// See [`Schedule::next_after`].
    ///
    /// Every fire instant comes from a matching wall time `c`. Let `g(c)` be
    /// the first instant whose wall clock reads `c` or later: the only
    /// instant of a time that exists once, the earlier of two, the end of the
    /// gap for a skipped time. `g` never decreases as `c` grows, and
    /// `g(c) > after` exactly for the `c` beyond the latest wall time shown
    /// up to `after` — the wall time at `after`, or the end of the repeated
    /// hour when `after` is in its second pass.
    ///
    /// - Fixed hours fire at `g(c)`: the answer is `g` of the first such `c`.
    /// - Elapsed time fires at every instant whose wall time is a `c` (none
    ///   for a skipped one). Besides `g` of the first such `c`, the second
    ///   pass through a repeated hour may come first: when `after` is in the
    ///   first pass, the second pass of the first candidate in the repeat;
    ///   when in the second pass, the rest of it.
    fn next_after(&self, zone: Tz, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let second = TimeDelta::seconds(1);
        let wall_after = after.with_timezone(&zone).naive_local();
        let mut cursor = wall_after;
        let mut best: Option<DateTime<Utc>> = None;
        if let LocalResult::Ambiguous(a, b) = zone.from_local_datetime(&wall_after) {
            let (first, again) = (a.min(b).to_utc(), a.max(b).to_utc());
            if first == after {
                // First pass: the second passes of the repeated wall times
                // up to now are still to come.
                if self.elapsed {
                    let start = transition(zone, after, again)
                        .with_timezone(&zone)
                        .naive_local();
                    if let Some(c) = self.next_wall(start - second)
                        && c <= wall_after
                    {
                        best = preimages(zone, c)
                            .map(|(_, again)| again)
                            .filter(|&t| t > after);
                    }
                }
            } else {
                // Second pass: every wall time up to the end of the repeat
                // has had its first pass.
                let end = transition(zone, first, after) - second;
                let end = end.with_timezone(&zone).naive_local();
                if self.elapsed
                    && let Some(c) = self.next_wall(wall_after)
                    && c <= end
                    && let Some((_, again)) = preimages(zone, c)
                    && again > after
                {
                    return Some(again);
                }
                cursor = end;
            }
        }
        loop {
            let Some(c) = self.next_wall(cursor) else {
                return best;
            };
            cursor = c;
            let t = match preimages(zone, c) {
                Some((first, again)) if first <= after && self.elapsed => again,
                Some((first, _)) => first,
                None => {
                    // Skipped by a gap: real time never reads this wall time.
                    let end = first_instant_reaching(zone, c)?;
                    if self.elapsed {
                        cursor = end.with_timezone(&zone).naive_local() - second;
                        continue;
                    }
                    end
                }
            };
            if t > after {
                return Some(best.map_or(t, |best| best.min(t)));
            }
        }
    }
}

/// The instants whose wall clock in `zone` reads `wall`: the earlier and the
/// later one (the same for a time that exists once), or `None` in a gap.
fn preimages(zone: Tz, wall: NaiveDateTime) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
    match zone.from_local_datetime(&wall) {
        LocalResult::Single(t) => Some((t.to_utc(), t.to_utc())),
        LocalResult::Ambiguous(a, b) => Some((a.min(b).to_utc(), a.max(b).to_utc())),
        LocalResult::None => None,
    }
}

/// The instant of the single change of UTC offset in `(from, to]`; `from`
/// and `to` must have different offsets.
fn transition(zone: Tz, from: DateTime<Utc>, to: DateTime<Utc>) -> DateTime<Utc> {
    let offset = |secs: i64| {
        DateTime::from_timestamp(secs, 0)
            .map(|t| zone.offset_from_utc_datetime(&t.naive_utc()).fix())
    };
    // Offsets change on whole seconds.
    let (mut lo, mut hi) = (from.timestamp(), to.timestamp());
    let before = offset(lo);
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if offset(mid) == before {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    DateTime::from_timestamp(hi, 0).unwrap_or(to)
}

/// The first (whole-second) instant whose wall clock in `zone` reads `wall`
/// or later; for a wall time skipped by a gap, the instant the gap ends.
fn first_instant_reaching(zone: Tz, wall: NaiveDateTime) -> Option<DateTime<Utc>> {
    let reaches = |secs: i64| {
        DateTime::from_timestamp(secs, 0)
            .is_none_or(|t| t.with_timezone(&zone).naive_local() >= wall)
    };
    // UTC offsets lie within ±26 h, so the wall clock reads earlier than
    // `wall` 27 h before it (as if UTC) and later 27 h after. Every crossing
    // in between jumps over `wall` (it does not exist), so bisection finds
    // the gap's end.
    let naive = wall.and_utc().timestamp();
    let (mut lo, mut hi) = (naive - 27 * 3600, naive + 27 * 3600);
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if reaches(mid) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    DateTime::from_timestamp(hi, 0)
}

// ---------------------------------------------------------------------------
// Parsing.

fn parse_kind(expr: &str) -> Result<Kind, String> {
    let fields: Vec<&str> = expr.split_whitespace().collect();
    match fields.as_slice() {
        [word, rest @ ..] if word.starts_with('@') => parse_macro(word, rest),
        [minute, hour, dom, month, dow] => parse_cron("0", minute, hour, dom, month, dow),
        [second, minute, hour, dom, month, dow] => {
            parse_cron(second, minute, hour, dom, month, dow)
        }
        _ => Err(EXPECTED.to_owned()),
    }
}

fn parse_macro(word: &str, rest: &[&str]) -> Result<Kind, String> {
    let word = word.to_ascii_lowercase();
    if word == "@every" {
        return match rest {
            [duration] => parse_every(duration).map(|period_nanos| Kind::Every { period_nanos }),
            _ => Err(EVERY_EXPECTED.to_owned()),
        };
    }
    let fields = match word.as_str() {
        "@yearly" | "@annually" => ["0", "0", "1", "1", "*"],
        "@monthly" => ["0", "0", "1", "*", "*"],
        "@weekly" => ["0", "0", "*", "*", "0"],
        "@daily" | "@midnight" => ["0", "0", "*", "*", "*"],
        "@hourly" => ["0", "*", "*", "*", "*"],
        _ => return Err(EXPECTED.to_owned()),
    };
    if !rest.is_empty() {
        return Err(format!("{word} takes nothing after it; {EXPECTED}"));
    }
    let [minute, hour, dom, month, dow] = fields;
    parse_cron("0", minute, hour, dom, month, dow)
}

/// An `@every` duration in nanoseconds.
fn parse_every(text: &str) -> Result<i128, String> {
    let bad = || EVERY_EXPECTED.to_owned();
    let too_long = || format!("@every {text}: too long");
    let mut millis: u64 = 0;
    let mut rest = text;
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(bad());
        }
        let amount: u64 = rest[..digits].parse().map_err(|_| too_long())?;
        rest = &rest[digits..];
        let letters = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let unit: u64 = match &rest[..letters] {
            "h" => 3_600_000,
            "m" => 60_000,
            "s" => 1_000,
            "ms" => 1,
            _ => return Err(bad()),
        };
        rest = &rest[letters..];
        millis = amount
            .checked_mul(unit)
            .and_then(|m| millis.checked_add(m))
            .ok_or_else(too_long)?;
    }
    if millis < 1_000 {
        return Err(format!("@every {text}: the period must be at least 1s"));
    }
    Ok(i128::from(millis) * 1_000_000)
}

/// How one cron field is written.
#[derive(Clone, Copy)]
struct FieldSpec {
    name: &'static str,
    min: u32,
    max: u32,
    /// The end of `*` and of `a/s` (day-of-week: 6, as 7 repeats 0).
    wild_max: u32,
    /// Three-letter names, `names[i]` meaning `name_base + i`.
    names: &'static [&'static str],
    name_base: u32,
    /// Whether `?` ("any") is allowed.
    question: bool,
}

const WEEKDAYS: [&str; 7] = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"];
const MONTHS: [&str; 12] = [
    "JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC",
];

const fn numeric(name: &'static str, min: u32, max: u32) -> FieldSpec {
    FieldSpec {
        name,
        min,
        max,
        wild_max: max,
        names: &[],
        name_base: 0,
        question: false,
    }
}

const SECOND: FieldSpec = numeric("second", 0, 59);
const MINUTE: FieldSpec = numeric("minute", 0, 59);
const HOUR: FieldSpec = numeric("hour", 0, 23);
const DAY_OF_MONTH: FieldSpec = FieldSpec {
    question: true,
    ..numeric("day-of-month", 1, 31)
};
const MONTH: FieldSpec = FieldSpec {
    names: &MONTHS,
    name_base: 1,
    ..numeric("month", 1, 12)
};
const DAY_OF_WEEK: FieldSpec = FieldSpec {
    name: "day-of-week",
    min: 0,
    max: 7,
    wild_max: 6,
    names: &WEEKDAYS,
    name_base: 0,
    question: true,
};

/// One field, checked.
struct Field {
    /// The field in the `cron` crate's syntax: numbers only, `?` as `*`.
    text: String,
    /// The values it matches (day-of-week: 0-7, 7 being Sunday again).
    values: BTreeSet<u32>,
    /// Exactly `*`, `?` or `*/1`: matches anything, for the
    /// day-of-month/day-of-week "either" rule.
    any: bool,
}

fn parse_cron(
    second: &str,
    minute: &str,
    hour: &str,
    dom: &str,
    month: &str,
    dow: &str,
) -> Result<Kind, String> {
    let second = parse_field(SECOND, second)?;
    let minute = parse_field(MINUTE, minute)?;
    let hour = parse_field(HOUR, hour)?;
    let dom = parse_field(DAY_OF_MONTH, dom)?;
    let month = parse_field(MONTH, month)?;
    let dow = parse_field(DAY_OF_WEEK, dow)?;

    // The crate numbers days 1 (Sunday) to 7 (Saturday); names avoid the
    // off-by-one and standard cron's second Sunday (7).
    let dow_text = if dow.any {
        "*".to_owned()
    } else {
        let days: BTreeSet<usize> = dow.values.iter().map(|&d| d as usize % 7).collect();
        days.iter()
            .map(|&d| WEEKDAYS[d])
            .collect::<Vec<_>>()
            .join(",")
    };
    let line = |dom: &str, dow: &str| {
        format!(
            "{} {} {} {dom} {} {dow}",
            second.text, minute.text, hour.text, month.text
        )
    };
    let lines = if !dom.any && !dow.any {
        vec![line(&dom.text, "*"), line("*", &dow_text)]
    } else {
        vec![line(&dom.text, &dow_text)]
    };
    let parts = lines
        .iter()
        .map(|line| ::cron::Schedule::from_str(line).map_err(|e| format!("{e}")))
        .collect::<Result<Vec<_>, _>>()?;
    let elapsed = parts.first().is_some_and(|p| p.hours().is_all());
    Ok(Kind::Cron(Cron { parts, elapsed }))
}

fn parse_field(spec: FieldSpec, raw: &str) -> Result<Field, String> {
    let err = |problem: String| format!("{} field {raw:?}: {problem}", spec.name);
    let mut values = BTreeSet::new();
    let mut items = Vec::new();
    let mut any = false;
    let list: Vec<&str> = raw.split(',').collect();
    for item in &list {
        if item.is_empty() {
            return Err(err("empty list item".to_owned()));
        }
        let (base, step) = match item.split_once('/') {
            Some((base, step)) => {
                let parsed = step
                    .parse::<u32>()
                    .ok()
                    .filter(|s| (1..=spec.max).contains(s))
                    .ok_or_else(|| {
                        err(format!(
                            "step {step:?} must be a number from 1 to {}",
                            spec.max
                        ))
                    })?;
                (base, Some(parsed))
            }
            None => (*item, None),
        };
        let (lo, hi, text) = if base == "*" || base == "?" {
            if base == "?" && !spec.question {
                return Err(err(
                    "? is only allowed in day-of-month and day-of-week".to_owned()
                ));
            }
            if base == "?" && step.is_some() {
                return Err(err("? takes no step".to_owned()));
            }
            any |= list.len() == 1 && step.unwrap_or(1) == 1;
            (spec.min, spec.wild_max, "*".to_owned())
        } else if let Some((a_text, b_text)) = base.split_once('-') {
            let a = value(spec, a_text).map_err(err)?;
            let mut b = value(spec, b_text).map_err(err)?;
            // `FRI-SUN`: the name Sunday ends a day-of-week range as 7.
            if spec.name == DAY_OF_WEEK.name
                && b == 0
                && a > 0
                && !b_text.starts_with(|c: char| c.is_ascii_digit())
            {
                b = 7;
            }
            if a > b {
                return Err(err(format!(
                    "range {base} runs backwards; ranges do not wrap, use a list"
                )));
            }
            (a, b, format!("{a}-{b}"))
        } else {
            let a = value(spec, base).map_err(err)?;
            let hi = if step.is_some() {
                spec.wild_max.max(a)
            } else {
                a
            };
            (a, hi, a.to_string())
        };
        values.extend((lo..=hi).step_by(step.unwrap_or(1) as usize));
        items.push(match step {
            Some(step) => format!("{text}/{step}"),
            None => text,
        });
    }
    Ok(Field {
        text: items.join(","),
        values,
        any,
    })
}

/// One value of a field: a number in range or a name.
fn value(spec: FieldSpec, text: &str) -> Result<u32, String> {
    if text.is_empty() {
        return Err("missing value".to_owned());
    }
    if text.bytes().all(|b| b.is_ascii_digit()) {
        return text
            .parse::<u32>()
            .ok()
            .filter(|n| (spec.min..=spec.max).contains(n))
            .ok_or_else(|| format!("{text} is outside {}-{}", spec.min, spec.max));
    }
    let Some(i) = spec
        .names
        .iter()
        .position(|name| name.eq_ignore_ascii_case(text))
    else {
        return Err(match (spec.names.first(), spec.names.last()) {
            (Some(first), Some(last)) => format!(
                "{text:?} is neither a number from {} to {} nor a name {first}..{last}",
                spec.min, spec.max
            ),
            _ => format!("{text:?} is not a number from {} to {}", spec.min, spec.max),
        });
    };
    Ok(spec.name_base + i as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Datelike;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .unwrap_or_else(|e| panic!("{s}: {e}"))
            .to_utc()
    }

    fn sched(expr: &str, zone: &str) -> Schedule {
        Schedule::parse(expr, zone).unwrap_or_else(|e| panic!("{e}"))
    }

    fn fires(expr: &str, zone: &str, from: &str, to: &str) -> Vec<DateTime<Utc>> {
        sched(expr, zone).fires_between(at(from), at(to), 1000)
    }

    fn ats(list: &[&str]) -> Vec<DateTime<Utc>> {
        list.iter().map(|s| at(s)).collect()
    }

    /// `expression | after | expected next or "never"`, in UTC.
    #[test]
    fn next_fire_table_utc() {
        let table = [
            // steps, strictness, sub-second `after`
            "*/5 * * * *       | 2026-01-01T00:02:00Z     | 2026-01-01T00:05:00Z",
            "*/5 * * * *       | 2026-01-01T00:05:00Z     | 2026-01-01T00:10:00Z",
            "*/5 * * * *       | 2026-01-01T00:04:59.999Z | 2026-01-01T00:05:00Z",
            "7/20 * * * *      | 2026-01-01T10:28:00Z     | 2026-01-01T10:47:00Z",
            "7/20 * * * *      | 2026-01-01T10:47:00Z     | 2026-01-01T11:07:00Z",
            "* * * * *         | 2026-01-01T10:00:30Z     | 2026-01-01T10:01:00Z",
            // lists and ranges
            "15,45 8-10 * * *  | 2026-01-01T09:20:00Z     | 2026-01-01T09:45:00Z",
            "15,45 8-10 * * *  | 2026-01-01T10:45:00Z     | 2026-01-02T08:15:00Z",
            "0 8-18/4 * * *    | 2026-01-01T12:00:00Z     | 2026-01-01T16:00:00Z",
            "0 8-18/4 * * *    | 2026-01-01T16:00:00Z     | 2026-01-02T08:00:00Z",
            // days of the week (1 Jan 2026 is a Thursday)
            "0 9 * * MON-FRI   | 2026-01-03T12:00:00Z     | 2026-01-05T09:00:00Z",
            "0 9 * * mon-fri   | 2026-01-03T12:00:00Z     | 2026-01-05T09:00:00Z",
            "0 9 * * 1-5       | 2026-01-03T12:00:00Z     | 2026-01-05T09:00:00Z",
            "0 9 * * 1-5       | 2026-01-02T08:00:00Z     | 2026-01-02T09:00:00Z",
            "0 9 * * 0         | 2026-01-01T00:00:00Z     | 2026-01-04T09:00:00Z",
            "0 9 * * 7         | 2026-01-01T00:00:00Z     | 2026-01-04T09:00:00Z",
            "0 9 * * 6         | 2026-01-01T00:00:00Z     | 2026-01-03T09:00:00Z",
            "0 9 * * SUN       | 2026-01-01T00:00:00Z     | 2026-01-04T09:00:00Z",
            "0 9 * * Sun       | 2026-01-01T00:00:00Z     | 2026-01-04T09:00:00Z",
            "0 9 * * 5-7       | 2026-01-02T10:00:00Z     | 2026-01-03T09:00:00Z",
            "0 9 * * 5-7       | 2026-01-03T10:00:00Z     | 2026-01-04T09:00:00Z",
            "0 9 * * 5-7       | 2026-01-04T10:00:00Z     | 2026-01-09T09:00:00Z",
            "0 9 * * FRI-SUN   | 2026-01-04T10:00:00Z     | 2026-01-09T09:00:00Z",
            "0 9 * * SAT,SUN   | 2026-01-04T10:00:00Z     | 2026-01-10T09:00:00Z",
            "0 9 * * */2       | 2026-01-01T10:00:00Z     | 2026-01-03T09:00:00Z",
            "0 9 * * 1/2       | 2026-01-01T10:00:00Z     | 2026-01-02T09:00:00Z",
            "0 9 * * 1/2       | 2026-01-02T10:00:00Z     | 2026-01-05T09:00:00Z",
            // months
            "0 12 1 JAN,jul *  | 2026-01-01T13:00:00Z     | 2026-07-01T12:00:00Z",
            "0 0 1 */3 *       | 2026-01-01T00:00:00Z     | 2026-04-01T00:00:00Z",
            "0 0 1 FEB-APR/2 * | 2026-01-01T00:00:00Z     | 2026-02-01T00:00:00Z",
            "0 0 1 FEB-APR/2 * | 2026-02-01T00:00:00Z     | 2026-04-01T00:00:00Z",
            // short months, leap days, never
            "0 0 31 * *        | 2026-01-31T00:00:00Z     | 2026-03-31T00:00:00Z",
            "0 0 29 2 *        | 2026-03-01T00:00:00Z     | 2028-02-29T00:00:00Z",
            "0 0 29 FEB *      | 2028-02-29T00:00:00Z     | 2032-02-29T00:00:00Z",
            "0 0 30 2 *        | 2026-01-01T00:00:00Z     | never",
            "0 0 1 1 *         | 2100-01-01T00:00:00Z     | never",
            // day-of-month OR day-of-week when both are restricted
            "0 0 13 * FRI      | 2026-01-01T00:00:00Z     | 2026-01-02T00:00:00Z",
            "0 0 13 * FRI      | 2026-01-10T00:00:00Z     | 2026-01-13T00:00:00Z",
            "0 0 13 * 5        | 2026-01-13T00:00:00Z     | 2026-01-16T00:00:00Z",
            "0 0 13 * *        | 2026-01-01T00:00:00Z     | 2026-01-13T00:00:00Z",
            "0 0 ? * FRI       | 2026-01-02T00:00:00Z     | 2026-01-09T00:00:00Z",
            "0 0 13 * ?        | 2026-01-01T00:00:00Z     | 2026-01-13T00:00:00Z",
            "0 0 */10 * MON    | 2026-01-01T00:00:00Z     | 2026-01-05T00:00:00Z",
            "0 0 */10 * MON    | 2026-01-05T00:00:00Z     | 2026-01-11T00:00:00Z",
            "0 0 */1 * MON     | 2026-01-01T00:00:00Z     | 2026-01-05T00:00:00Z",
            // six fields, seconds first
            "*/10 * * * * *    | 2026-01-01T00:00:05Z     | 2026-01-01T00:00:10Z",
            "30 0 0 * * *      | 2026-01-01T00:00:30Z     | 2026-01-02T00:00:30Z",
            "0 30 2 * * *      | 2026-01-01T00:00:00Z     | 2026-01-01T02:30:00Z",
            "0 0 9 * * SAT     | 2026-01-01T00:00:00Z     | 2026-01-03T09:00:00Z",
            // macros
            "@hourly           | 2026-01-01T10:00:00Z     | 2026-01-01T11:00:00Z",
            "@daily            | 2026-01-01T00:00:00Z     | 2026-01-02T00:00:00Z",
            "@midnight         | 2026-01-01T12:00:00Z     | 2026-01-02T00:00:00Z",
            "@weekly           | 2026-01-01T00:00:00Z     | 2026-01-04T00:00:00Z",
            "@monthly          | 2026-01-01T00:00:00Z     | 2026-02-01T00:00:00Z",
            "@yearly           | 2026-01-01T00:00:00Z     | 2027-01-01T00:00:00Z",
            "@annually         | 2026-06-01T00:00:00Z     | 2027-01-01T00:00:00Z",
            "@DAILY            | 2026-01-01T00:00:00Z     | 2026-01-02T00:00:00Z",
        ];
        for row in table {
            let [expr, after, want] =
                <[&str; 3]>::try_from(row.split('|').map(str::trim).collect::<Vec<_>>())
                    .unwrap_or_else(|_| panic!("bad row {row:?}"));
            let got = sched(expr, "UTC").next_after(at(after));
            let want = (want != "never").then(|| at(want));
            assert_eq!(got, want, "{expr:?} after {after}");
        }
    }

    /// `@every`: multiples of the period since the epoch, whatever the zone.
    #[test]
    fn every_ticks_at_multiples_since_the_epoch() {
        let epoch = |secs: i64, nanos: u32| DateTime::from_timestamp(secs, nanos).unwrap();
        let instant = |text: &str| match text.split_once('.') {
            _ if text.contains('T') => at(text),
            Some((secs, frac)) => {
                let nanos = format!("{frac:0<9}").parse().unwrap();
                epoch(secs.parse().unwrap(), nanos)
            }
            None => epoch(text.parse().unwrap(), 0),
        };
        let table = [
            // 1_000_000_001 = 7 × 142_857_143; times as seconds[.nanos] since the epoch
            "@every 7s      | 1000000003                 | 1000000008",
            "@every 7s      | 1000000001                 | 1000000008",
            "@every 7s      | 1000000000.999999999       | 1000000001",
            "@every 7s      | -1                         | 0",
            "@every 7s      | -8                         | -7",
            "@every 1s      | 2026-01-01T10:00:00Z       | 2026-01-01T10:00:01Z",
            "@every 1s      | 2026-01-01T10:00:00.2Z     | 2026-01-01T10:00:01Z",
            "@every 30s     | 2026-01-01T10:00:10Z       | 2026-01-01T10:00:30Z",
            "@every 5m      | 2026-01-01T00:07:00Z       | 2026-01-01T00:10:00Z",
            // 2026-01-01T00:00Z is 327_264 × 5400 s
            "@every 1h30m   | 2026-01-01T00:00:00Z       | 2026-01-01T01:30:00Z",
            "@every 1h30m   | 2026-01-01T00:00:00.001Z   | 2026-01-01T01:30:00Z",
            "@every 90m     | 2026-01-01T00:00:00Z       | 2026-01-01T01:30:00Z",
            "@every 30m1h   | 2026-01-01T00:00:00Z       | 2026-01-01T01:30:00Z",
            "@every 1500ms  | 0                          | 1.5",
            "@every 1s500ms | 1.5                        | 3",
            "@every 24h     | 2026-01-01T05:00:00Z       | 2026-01-02T00:00:00Z",
            "@EVERY 1h      | 2026-01-01T05:00:00Z       | 2026-01-01T06:00:00Z",
        ];
        for row in table {
            let [expr, after, want] =
                <[&str; 3]>::try_from(row.split('|').map(str::trim).collect::<Vec<_>>())
                    .unwrap_or_else(|_| panic!("bad row {row:?}"));
            for zone in ["UTC", "Europe/Berlin", "Asia/Kolkata"] {
                let got = sched(expr, zone).next_after(instant(after));
                assert_eq!(got, Some(instant(want)), "{expr:?} in {zone} after {after}");
            }
        }
        // Every replica agrees, whenever it started.
        let s = sched("@every 45s", "UTC");
        let a = s.fires_between(epoch(1_000, 0), epoch(1_500, 0), 100);
        let b = s.fires_between(epoch(1_300, 1), epoch(1_500, 0), 100);
        assert!(a.ends_with(&b), "{a:?} vs {b:?}");
        assert!(a.iter().all(|t| t.timestamp() % 45 == 0));
    }

    /// Day-of-week translation to the `cron` crate (which counts Sunday as
    /// 1), checked through real fire dates for every form of the field.
    #[test]
    fn day_of_week_forms_fire_on_the_right_days() {
        fn expected(items: &[(u32, u32, u32)]) -> BTreeSet<u32> {
            items
                .iter()
                .flat_map(|&(lo, hi, step)| (lo..=hi).step_by(step as usize))
                .map(|d| d % 7)
                .collect()
        }
        let mut cases: Vec<(String, BTreeSet<u32>)> = Vec::new();
        for d in 0..=7u32 {
            cases.push((d.to_string(), expected(&[(d, d, 1)])));
            for step in 1..=7 {
                cases.push((format!("{d}/{step}"), expected(&[(d, d.max(6), step)])));
            }
            for e in d..=7 {
                cases.push((format!("{d}-{e}"), expected(&[(d, e, 1)])));
                for step in 1..=7 {
                    cases.push((format!("{d}-{e}/{step}"), expected(&[(d, e, step)])));
                }
                let (dn, en) = (WEEKDAYS[d as usize % 7], WEEKDAYS[e as usize % 7]);
                if d < e && !(d == 0 && e == 7) {
                    cases.push((format!("{dn}-{en}"), expected(&[(d, e, 1)])));
                    let lower = format!("{}-{}", dn.to_lowercase(), en.to_lowercase());
                    cases.push((lower, expected(&[(d, e, 1)])));
                }
            }
            let name = WEEKDAYS[d as usize % 7];
            cases.push((name.to_owned(), expected(&[(d, d, 1)])));
            cases.push((name.to_lowercase(), expected(&[(d, d, 1)])));
        }
        for step in 1..=7 {
            cases.push((format!("*/{step}"), expected(&[(0, 6, step)])));
        }
        cases.push(("*".to_owned(), expected(&[(0, 6, 1)])));
        cases.push(("?".to_owned(), expected(&[(0, 6, 1)])));
        cases.push(("0,7".to_owned(), expected(&[(0, 0, 1)])));
        cases.push(("1,3,5".to_owned(), expected(&[(1, 5, 2)])));
        cases.push(("MON,wed,Fri".to_owned(), expected(&[(1, 5, 2)])));
        cases.push(("6,0-1".to_owned(), expected(&[(6, 8, 1)])));
        cases.push(("SUN-SAT".to_owned(), expected(&[(0, 6, 1)])));

        // Two weeks from Sunday 4 January 2026, one fire a matching day.
        for (field, want) in cases {
            let s = sched(&format!("0 12 * * {field}"), "UTC");
            let got = s.fires_between(at("2026-01-04T00:00:00Z"), at("2026-01-18T00:00:00Z"), 100);
            let days: BTreeSet<u32> = got
                .iter()
                .map(|t| t.weekday().num_days_from_sunday())
                .collect();
            assert_eq!(days, want, "day-of-week {field:?}");
            assert_eq!(got.len(), 2 * want.len(), "day-of-week {field:?}: {got:?}");
        }
    }

    #[test]
    fn month_names_in_any_case() {
        for (i, name) in MONTHS.iter().enumerate() {
            let month = i as u32 + 1;
            for spelled in [
                name.to_string(),
                name.to_lowercase(),
                format!("{}{}", &name[..1], name[1..].to_lowercase()),
            ] {
                for field in [spelled.clone(), month.to_string()] {
                    let next = sched(&format!("0 0 1 {field} *"), "UTC")
                        .next_after(at("2025-12-31T00:00:00Z"))
                        .unwrap();
                    assert_eq!(
                        (next.year(), next.month(), next.day()),
                        (2026, month, 1),
                        "{field}"
                    );
                }
            }
        }
    }

    // Europe/Berlin 2026: 29 March 02:00 CET → 03:00 CEST (01:00 UTC);
    // 25 October 03:00 CEST → 02:00 CET (01:00 UTC).

    #[test]
    fn berlin_fixed_hour_in_the_spring_gap_fires_once_after_it() {
        let got = fires(
            "30 2 * * *",
            "Europe/Berlin",
            "2026-03-27T00:00:00Z",
            "2026-03-31T00:00:00Z",
        );
        let want = ats(&[
            "2026-03-27T01:30:00Z", // 02:30 CET
            "2026-03-28T01:30:00Z",
            "2026-03-29T01:00:00Z", // 02:30 does not exist: 03:00 CEST
            "2026-03-30T00:30:00Z", // 02:30 CEST
        ]);
        assert_eq!(got, want);
        // The six-field form of the design's example agrees.
        let six = fires(
            "0 30 2 * * *",
            "Europe/Berlin",
            "2026-03-27T00:00:00Z",
            "2026-03-31T00:00:00Z",
        );
        assert_eq!(six, want);
        // Skipped times and the real time after the gap fire once together.
        for expr in [
            "0 2 * * *",
            "0 2,3 * * *",
            "*/15 2 * * *",
            "* 2 * * *",
            "0 0 2 * * *",
        ] {
            let got = fires(
                expr,
                "Europe/Berlin",
                "2026-03-28T12:00:00Z",
                "2026-03-29T12:00:00Z",
            );
            assert_eq!(got, ats(&["2026-03-29T01:00:00Z"]), "{expr}");
        }
        let got = fires(
            "0 3 * * *",
            "Europe/Berlin",
            "2026-03-28T12:00:00Z",
            "2026-03-29T12:00:00Z",
        );
        assert_eq!(got, ats(&["2026-03-29T01:00:00Z"]));
        // Asking from inside the gap's replacement does not repeat it.
        let s = sched("30 2 * * *", "Europe/Berlin");
        assert_eq!(
            s.next_after(at("2026-03-29T00:59:59Z")),
            Some(at("2026-03-29T01:00:00Z"))
        );
        assert_eq!(
            s.next_after(at("2026-03-29T01:00:00Z")),
            Some(at("2026-03-30T00:30:00Z"))
        );
        assert!(!s.follows_elapsed_time());
    }

    #[test]
    fn berlin_fixed_hour_in_the_repeated_hour_fires_once() {
        let got = fires(
            "30 2 * * *",
            "Europe/Berlin",
            "2026-10-23T00:00:00Z",
            "2026-10-27T00:00:00Z",
        );
        let want = ats(&[
            "2026-10-23T00:30:00Z", // 02:30 CEST
            "2026-10-24T00:30:00Z",
            "2026-10-25T00:30:00Z", // the first 02:30 (CEST) only
            "2026-10-26T01:30:00Z", // 02:30 CET
        ]);
        assert_eq!(got, want);
        let s = sched("30 2 * * *", "Europe/Berlin");
        for after in [
            "2026-10-25T00:30:00Z",
            "2026-10-25T00:45:00Z",
            "2026-10-25T01:10:00Z",
            "2026-10-25T01:30:00Z",
            "2026-10-25T01:45:00Z",
        ] {
            assert_eq!(
                s.next_after(at(after)),
                Some(at("2026-10-26T01:30:00Z")),
                "after {after}"
            );
        }
        // A fixed hour that repeats within itself runs in the first pass only.
        let got = fires(
            "*/15 2 * * *",
            "Europe/Berlin",
            "2026-10-24T12:00:00Z",
            "2026-10-25T12:00:00Z",
        );
        assert_eq!(
            got,
            ats(&[
                "2026-10-25T00:00:00Z",
                "2026-10-25T00:15:00Z",
                "2026-10-25T00:30:00Z",
                "2026-10-25T00:45:00Z"
            ])
        );
        // 02:00 CEST and 03:00 CET are two hours apart.
        let got = fires(
            "0 2,3 * * *",
            "Europe/Berlin",
            "2026-10-24T12:00:00Z",
            "2026-10-25T12:00:00Z",
        );
        assert_eq!(got, ats(&["2026-10-25T00:00:00Z", "2026-10-25T02:00:00Z"]));
        // Midnight is unaffected, but its UTC instant moves.
        let got = fires(
            "@daily",
            "Europe/Berlin",
            "2026-10-24T00:00:00Z",
            "2026-10-27T00:00:00Z",
        );
        assert_eq!(
            got,
            ats(&[
                "2026-10-24T22:00:00Z",
                "2026-10-25T23:00:00Z",
                "2026-10-26T23:00:00Z"
            ])
        );
    }

    #[test]
    fn berlin_repeating_schedules_follow_elapsed_time() {
        let quarter = sched("*/15 * * * *", "Europe/Berlin");
        assert!(quarter.follows_elapsed_time());
        // Spring: 01:45 CET, then 03:00 CEST 15 minutes later.
        let got =
            quarter.fires_between(at("2026-03-29T00:30:00Z"), at("2026-03-29T01:30:00Z"), 100);
        assert_eq!(
            got,
            ats(&[
                "2026-03-29T00:45:00Z",
                "2026-03-29T01:00:00Z",
                "2026-03-29T01:15:00Z",
                "2026-03-29T01:30:00Z"
            ])
        );
        // Autumn: every 15 real minutes through both 02:xx hours.
        let got =
            quarter.fires_between(at("2026-10-24T23:30:00Z"), at("2026-10-25T02:00:00Z"), 100);
        let want: Vec<_> = (0..10)
            .map(|i| at("2026-10-24T23:45:00Z") + TimeDelta::minutes(15 * i))
            .collect();
        assert_eq!(got, want);
        // From inside the first 02:xx hour, the second 02:00 comes next.
        for (after, next) in [
            ("2026-10-25T00:10:00Z", "2026-10-25T00:15:00Z"),
            ("2026-10-25T00:45:00Z", "2026-10-25T01:00:00Z"),
            ("2026-10-25T00:50:00Z", "2026-10-25T01:00:00Z"),
            ("2026-10-25T00:59:59.5Z", "2026-10-25T01:00:00Z"),
            ("2026-10-25T01:00:00Z", "2026-10-25T01:15:00Z"),
            ("2026-10-25T01:50:00Z", "2026-10-25T02:00:00Z"),
        ] {
            assert_eq!(
                quarter.next_after(at(after)),
                Some(at(next)),
                "after {after}"
            );
        }
        // Hourly at :05 stays 60 real minutes apart: no extra fire after the
        // gap, two in the repeated hour.
        let got = fires(
            "5 * * * *",
            "Europe/Berlin",
            "2026-03-29T00:00:00Z",
            "2026-03-29T02:00:00Z",
        );
        assert_eq!(got, ats(&["2026-03-29T00:05:00Z", "2026-03-29T01:05:00Z"]));
        let got = fires(
            "5 * * * *",
            "Europe/Berlin",
            "2026-10-24T23:00:00Z",
            "2026-10-25T03:00:00Z",
        );
        assert_eq!(
            got,
            ats(&[
                "2026-10-24T23:05:00Z",
                "2026-10-25T00:05:00Z",
                "2026-10-25T01:05:00Z",
                "2026-10-25T02:05:00Z"
            ])
        );
        // Seconds, through both transitions.
        for day in ["2026-03-29", "2026-10-25"] {
            let from = at(&format!("{day}T00:59:00Z"));
            let got = sched("*/30 * * * * *", "Europe/Berlin").fires_between(
                from,
                from + TimeDelta::minutes(2),
                100,
            );
            let want: Vec<_> = (1..=4).map(|i| from + TimeDelta::seconds(30 * i)).collect();
            assert_eq!(got, want, "{day}");
            let got = sched("* * * * * *", "Europe/Berlin").fires_between(
                from,
                from + TimeDelta::minutes(2),
                1000,
            );
            let want: Vec<_> = (1..=120).map(|i| from + TimeDelta::seconds(i)).collect();
            assert_eq!(got, want, "{day}");
        }
    }

    // America/New_York 2026: 8 March 02:00 EST → 03:00 EDT (07:00 UTC);
    // 1 November 02:00 EDT → 01:00 EST (06:00 UTC).

    #[test]
    fn new_york_transitions() {
        let zone = "America/New_York";
        let got = fires(
            "30 2 * * *",
            zone,
            "2026-03-07T00:00:00Z",
            "2026-03-10T00:00:00Z",
        );
        assert_eq!(
            got,
            ats(&[
                "2026-03-07T07:30:00Z",
                "2026-03-08T07:00:00Z",
                "2026-03-09T06:30:00Z"
            ])
        );
        let got = fires(
            "30 1 * * *",
            zone,
            "2026-10-31T00:00:00Z",
            "2026-11-03T00:00:00Z",
        );
        assert_eq!(
            got,
            ats(&[
                "2026-10-31T05:30:00Z",
                "2026-11-01T05:30:00Z",
                "2026-11-02T06:30:00Z"
            ])
        );
        let got = fires(
            "0 1 * * *",
            zone,
            "2026-10-31T12:00:00Z",
            "2026-11-01T12:00:00Z",
        );
        assert_eq!(got, ats(&["2026-11-01T05:00:00Z"]));
        let got = fires(
            "0 2 * * *",
            zone,
            "2026-03-07T12:00:00Z",
            "2026-03-08T12:00:00Z",
        );
        assert_eq!(got, ats(&["2026-03-08T07:00:00Z"]));
        let got = fires(
            "0 2 * * *",
            zone,
            "2026-10-31T12:00:00Z",
            "2026-11-01T12:00:00Z",
        );
        assert_eq!(got, ats(&["2026-11-01T07:00:00Z"]));

        let got = fires(
            "*/15 * * * *",
            zone,
            "2026-03-08T06:40:00Z",
            "2026-03-08T07:20:00Z",
        );
        assert_eq!(
            got,
            ats(&[
                "2026-03-08T06:45:00Z",
                "2026-03-08T07:00:00Z",
                "2026-03-08T07:15:00Z"
            ])
        );
        let got = fires(
            "*/15 * * * *",
            zone,
            "2026-11-01T04:50:00Z",
            "2026-11-01T06:20:00Z",
        );
        let want: Vec<_> = (0..6)
            .map(|i| at("2026-11-01T05:00:00Z") + TimeDelta::minutes(15 * i))
            .collect();
        assert_eq!(got, want);
        let got = fires(
            "@hourly",
            zone,
            "2026-11-01T04:30:00Z",
            "2026-11-01T08:30:00Z",
        );
        assert_eq!(
            got,
            ats(&[
                "2026-11-01T05:00:00Z",
                "2026-11-01T06:00:00Z",
                "2026-11-01T07:00:00Z",
                "2026-11-01T08:00:00Z"
            ])
        );
        let got = fires(
            "@hourly",
            zone,
            "2026-03-08T05:30:00Z",
            "2026-03-08T08:30:00Z",
        );
        assert_eq!(
            got,
            ats(&[
                "2026-03-08T06:00:00Z",
                "2026-03-08T07:00:00Z",
                "2026-03-08T08:00:00Z"
            ])
        );
    }

    #[test]
    fn other_zones_half_hour_shift_and_midnight_gap() {
        // Lord Howe, 2026: 4 Apr 15:00 UTC 02:00 → 01:30; 3 Oct 15:30 UTC
        // 02:00 → 02:30.
        let zone = "Australia/Lord_Howe";
        let got = fires(
            "*/15 * * * *",
            zone,
            "2026-04-04T14:20:00Z",
            "2026-04-04T15:30:00Z",
        );
        let want: Vec<_> = (0..5)
            .map(|i| at("2026-04-04T14:30:00Z") + TimeDelta::minutes(15 * i))
            .collect();
        assert_eq!(got, want);
        let got = fires(
            "45 1 * * *",
            zone,
            "2026-04-04T00:00:00Z",
            "2026-04-05T00:00:00Z",
        );
        assert_eq!(got, ats(&["2026-04-04T14:45:00Z"]));
        let got = fires(
            "*/15 * * * *",
            zone,
            "2026-10-03T15:00:00Z",
            "2026-10-03T16:00:00Z",
        );
        let want: Vec<_> = (1..=4)
            .map(|i| at("2026-10-03T15:00:00Z") + TimeDelta::minutes(15 * i))
            .collect();
        assert_eq!(got, want);
        let got = fires(
            "15 2 * * *",
            zone,
            "2026-10-03T00:00:00Z",
            "2026-10-04T00:00:00Z",
        );
        assert_eq!(got, ats(&["2026-10-03T15:30:00Z"]));
        // Santiago skips midnight on 6 September 2026 (00:00 → 01:00 at 04:00 UTC).
        let got = fires(
            "@daily",
            "America/Santiago",
            "2026-09-05T00:00:00Z",
            "2026-09-08T00:00:00Z",
        );
        assert_eq!(
            got,
            ats(&[
                "2026-09-05T04:00:00Z",
                "2026-09-06T04:00:00Z",
                "2026-09-07T03:00:00Z"
            ])
        );
        // A zone without DST is a fixed offset.
        let got = fires(
            "30 9 * * MON-FRI",
            "Asia/Kolkata",
            "2026-01-01T00:00:00Z",
            "2026-01-03T00:00:00Z",
        );
        assert_eq!(got, ats(&["2026-01-01T04:00:00Z", "2026-01-02T04:00:00Z"]));
    }

    #[test]
    fn fires_between_is_half_open_and_bounded() {
        let s = sched("*/5 * * * *", "UTC");
        let got = s.fires_between(at("2026-01-01T00:00:00Z"), at("2026-01-01T00:20:00Z"), 100);
        assert_eq!(
            got,
            ats(&[
                "2026-01-01T00:05:00Z",
                "2026-01-01T00:10:00Z",
                "2026-01-01T00:15:00Z",
                "2026-01-01T00:20:00Z"
            ])
        );
        let got = s.fires_between(at("2026-01-01T00:00:00Z"), at("2026-01-01T00:20:00Z"), 2);
        assert_eq!(got, ats(&["2026-01-01T00:05:00Z", "2026-01-01T00:10:00Z"]));
        assert!(
            s.fires_between(at("2026-01-01T00:00:00Z"), at("2026-01-01T00:20:00Z"), 0)
                .is_empty()
        );
        assert!(
            s.fires_between(at("2026-01-01T00:01:00Z"), at("2026-01-01T00:04:59Z"), 10)
                .is_empty()
        );
        assert!(
            s.fires_between(at("2026-01-01T00:20:00Z"), at("2026-01-01T00:00:00Z"), 10)
                .is_empty()
        );
        // A day of downtime of an every-second schedule, counted up to the limit.
        let s = sched("@every 1s", "UTC");
        assert_eq!(
            s.fires_between(
                at("2026-01-01T00:00:00Z"),
                at("2026-01-02T00:00:00Z"),
                10_000
            )
            .len(),
            10_000
        );
    }

    #[test]
    fn invalid_schedules_name_the_problem() {
        let table: &[(&str, &str)] = &[
            ("", EXPECTED),
            ("   ", EXPECTED),
            ("*/5 * * *", EXPECTED),
            ("0 0 0 * * * *", EXPECTED),
            ("@often", EXPECTED),
            ("@reboot", EXPECTED),
            ("@daily 5", "takes nothing after it"),
            ("60 * * * *", "minute field \"60\": 60 is outside 0-59"),
            ("* 24 * * *", "hour field \"24\": 24 is outside 0-23"),
            ("* * 0 * *", "day-of-month field \"0\": 0 is outside 1-31"),
            (
                "* * 32 * *",
                "day-of-month field \"32\": 32 is outside 1-31",
            ),
            ("* * * 0 *", "month field \"0\": 0 is outside 1-12"),
            ("* * * 13 *", "month field \"13\": 13 is outside 1-12"),
            ("* * * * 8", "day-of-week field \"8\": 8 is outside 0-7"),
            ("60 * * * * *", "second field \"60\""),
            (
                "* * * * FUNDAY",
                "\"FUNDAY\" is neither a number from 0 to 7 nor a name SUN..SAT",
            ),
            ("* * * * MONDAY", "day-of-week field"),
            ("* * * JANUARY *", "nor a name JAN..DEC"),
            ("* * * FOO *", "month field \"FOO\""),
            (
                "MON * * * *",
                "minute field \"MON\": \"MON\" is not a number from 0 to 59",
            ),
            ("5-1 * * * *", "range 5-1 runs backwards"),
            ("* 22-2 * * *", "range 22-2 runs backwards"),
            ("* * * * 5-0", "range 5-0 runs backwards"),
            ("*/0 * * * *", "step \"0\" must be a number from 1 to 59"),
            ("*/60 * * * *", "step \"60\" must be a number from 1 to 59"),
            ("*/x * * * *", "step \"x\""),
            ("1,,2 * * * *", "empty list item"),
            ("1, * * * *", "empty list item"),
            ("-5 * * * *", "missing value"),
            (
                "? * * * *",
                "? is only allowed in day-of-month and day-of-week",
            ),
            ("* * ?/2 * *", "? takes no step"),
            ("* * L * *", "day-of-month field \"L\""),
            ("* * * * 5#2", "day-of-week field \"5#2\""),
            ("* * 1W * *", "day-of-month field \"1W\""),
            ("1.5 * * * *", "minute field"),
            ("@every", EVERY_EXPECTED),
            ("@every soon", EVERY_EXPECTED),
            ("@every 5", EVERY_EXPECTED),
            ("@every 5x", EVERY_EXPECTED),
            ("@every -5s", EVERY_EXPECTED),
            ("@every 1.5h", EVERY_EXPECTED),
            ("@every 1h 30m", EVERY_EXPECTED),
            ("@every 1H", EVERY_EXPECTED),
            ("@every 0s", "the period must be at least 1s"),
            ("@every 500ms", "the period must be at least 1s"),
            ("@every 999ms", "the period must be at least 1s"),
            ("@every 99999999999999999999h", "too long"),
            ("@every 9999999999999999h", "too long"),
        ];
        for (expr, want) in table {
            match Schedule::parse(expr, "UTC") {
                Ok(s) => panic!("{expr:?} parsed: {s:?}"),
                Err(e) => {
                    assert_eq!(e.key(), "schedule", "{expr:?}");
                    let message = e.to_string();
                    assert!(
                        message.starts_with(&format!("schedule {expr:?}: ")),
                        "{message}"
                    );
                    assert!(message.contains(want), "{expr:?}: {message}");
                }
            }
        }
    }

    #[test]
    fn error_messages_read_well() {
        let e = Schedule::parse("*/5 * * *", "UTC").unwrap_err();
        assert_eq!(
            e.to_string(),
            "schedule \"*/5 * * *\": expected 5 fields (minute hour day-of-month month day-of-week), \
             6 with seconds first, @every 30s, or @hourly/@daily/@weekly/@monthly/@yearly"
        );
        let e = Schedule::parse("*/5 * * * *", "Mars/Base").unwrap_err();
        assert_eq!(e.key(), "timezone");
        assert_eq!(
            e.to_string(),
            "timezone \"Mars/Base\": not an IANA time zone such as Europe/Berlin"
        );
        for zone in ["", "europe/berlin", "Europe/ Berlin", "CEST", "+02:00"] {
            let e = Schedule::parse("@daily", zone).unwrap_err();
            assert_eq!(e.key(), "timezone", "{zone:?}");
        }
        let e = Schedule::parse("0 0 31 2 FUNDAY", "Mars/Base").unwrap_err();
        assert_eq!(e.key(), "schedule", "the schedule is checked first");
    }

    #[test]
    fn valid_zones_and_accessors() {
        for zone in [
            "UTC",
            "Etc/UTC",
            "Europe/Berlin",
            "America/New_York",
            "Asia/Kolkata",
            " Europe/Berlin ",
        ] {
            let s = sched("@daily", zone);
            assert_eq!(s.timezone().name(), zone.trim());
        }
        let spaced = sched("  0  9 * *\t1 ", "UTC");
        let next = spaced.next_after(at("2026-01-01T00:00:00Z"));
        assert_eq!(next, Some(at("2026-01-05T09:00:00Z")));
        let s = sched("0 30 2 * * *", "Europe/Berlin");
        assert_eq!(s.expression(), "0 30 2 * * *");
        assert_eq!(s.to_string(), "0 30 2 * * * (Europe/Berlin)");
        assert!(!s.follows_elapsed_time());
        assert!(sched("@every 1h", "UTC").follows_elapsed_time());
        assert!(sched("@hourly", "UTC").follows_elapsed_time());
        assert!(sched("0 0-23 * * *", "UTC").follows_elapsed_time());
        assert!(!sched("0 */2 * * *", "UTC").follows_elapsed_time());
        assert!(!sched("@daily", "UTC").follows_elapsed_time());
    }

    /// Cross-check against brute force over every minute around the DST
    /// transitions of 2026 in several zones: elapsed-time schedules fire at
    /// each minute whose wall time matches; fixed-hour ones at each minute
    /// where the wall clock first reaches matching times.
    #[test]
    fn dst_semantics_match_brute_force() {
        struct Oracle {
            minutes: BTreeSet<u32>,
            hours: BTreeSet<u32>,
            doms: BTreeSet<u32>,
            months: BTreeSet<u32>,
            dows: BTreeSet<u32>,
            dom_any: bool,
            dow_any: bool,
        }
        impl Oracle {
            fn new(expr: &str) -> Oracle {
                let f: Vec<&str> = expr.split_whitespace().collect();
                let field =
                    |spec, i: usize| parse_field(spec, f[i]).unwrap_or_else(|e| panic!("{e}"));
                let (dom, dow) = (field(DAY_OF_MONTH, 2), field(DAY_OF_WEEK, 4));
                Oracle {
                    minutes: field(MINUTE, 0).values,
                    hours: field(HOUR, 1).values,
                    doms: dom.values,
                    months: field(MONTH, 3).values,
                    dows: dow.values.iter().map(|d| d % 7).collect(),
                    dom_any: dom.any,
                    dow_any: dow.any,
                }
            }
            fn matches(&self, wall: NaiveDateTime) -> bool {
                use chrono::Timelike;
                let dom = self.doms.contains(&wall.day());
                let dow = self.dows.contains(&wall.weekday().num_days_from_sunday());
                let day = if self.dom_any || self.dow_any {
                    dom && dow
                } else {
                    dom || dow
                };
                wall.second() == 0
                    && self.minutes.contains(&wall.minute())
                    && self.hours.contains(&wall.hour())
                    && self.months.contains(&wall.month())
                    && day
            }
            fn fires(
                &self,
                zone: Tz,
                from: DateTime<Utc>,
                to: DateTime<Utc>,
            ) -> Vec<DateTime<Utc>> {
                let elapsed = self.hours.len() == 24;
                let wall = |t: DateTime<Utc>| t.with_timezone(&zone).naive_local();
                let minute = TimeDelta::minutes(1);
                let mut t = from - TimeDelta::hours(3);
                let mut high = wall(t);
                let mut out = Vec::new();
                while t < to {
                    t += minute;
                    let now = wall(t);
                    let fire = if elapsed {
                        self.matches(now)
                    } else {
                        let mut c = high + minute;
                        let mut any = false;
                        while c <= now {
                            any |= self.matches(c);
                            c += minute;
                        }
                        any
                    };
                    high = high.max(now);
                    if fire && t > from {
                        out.push(t);
                    }
                }
                out
            }
        }

        let exprs = [
            "*/15 * * * *",
            "5 * * * *",
            "*/7 * * * *",
            "59 * * * *",
            "0 0-23 * * *",
            "30 2 * * *",
            "*/15 2 * * *",
            "0 2,3 * * *",
            "* 2 * * *",
            "* 1 * * *",
            "0 */2 * * *",
            "15,45 0-3 * * *",
            "0 0 * * *",
            "30 1 * * *",
            "45 1 * * *",
            "15 2 * * *",
            "0,30 1-2 * * SUN",
            "0 23 * * *",
            "30 0 * * *",
        ];
        let transitions = [
            ("Europe/Berlin", "2026-03-29T01:00:00Z"),
            ("Europe/Berlin", "2026-10-25T01:00:00Z"),
            ("America/New_York", "2026-03-08T07:00:00Z"),
            ("America/New_York", "2026-11-01T06:00:00Z"),
            ("Australia/Lord_Howe", "2026-04-04T15:00:00Z"),
            ("Australia/Lord_Howe", "2026-10-03T15:30:00Z"),
            ("America/Santiago", "2026-04-05T03:00:00Z"),
            ("America/Santiago", "2026-09-06T04:00:00Z"),
        ];
        for (zone_name, at_transition) in transitions {
            let zone: Tz = zone_name.parse().unwrap();
            let center = at(at_transition);
            let (from, to) = (center - TimeDelta::hours(4), center + TimeDelta::hours(4));
            for expr in exprs {
                let oracle = Oracle::new(expr);
                let s = sched(expr, zone_name);
                let want = oracle.fires(zone, from, to);
                let got = s.fires_between(from, to, 1000);
                assert_eq!(got, want, "{expr} in {zone_name} around {at_transition}");
                // next_after from every minute, and half a minute past it.
                let beyond = oracle.fires(zone, from, to + TimeDelta::days(2));
                let mut a = from;
                while a < to {
                    for probe in [a, a + TimeDelta::seconds(30)] {
                        let want = beyond.iter().find(|&&t| t > probe).copied();
                        if want.is_some() {
                            assert_eq!(
                                s.next_after(probe),
                                want,
                                "{expr} in {zone_name} after {probe}"
                            );
                        }
                    }
                    a += TimeDelta::minutes(1);
                }
            }
        }
    }
}

#[cfg(test)]
mod model_checks {
    use std::collections::BTreeMap;

    use crate::{FunctionSpec, Stack};

    #[test]
    fn a_bad_schedule_or_zone_is_a_config_error_naming_the_key() {
        let ann = |s: &str, tz: &str| {
            BTreeMap::from([
                ("ebb.io/schedule".to_owned(), s.to_owned()),
                ("ebb.io/timezone".to_owned(), tz.to_owned()),
            ])
        };
        let e = FunctionSpec::from_annotations(
            "nightly",
            "shop",
            &ann("61 * * * *", "UTC"),
            &BTreeMap::new(),
        )
        .unwrap_err();
        assert_eq!(e.key(), Some("ebb.io/schedule"));
        assert!(e.to_string().contains("61"), "{e}");
        let e = FunctionSpec::from_annotations(
            "nightly",
            "shop",
            &ann("@daily", "Mars/Base"),
            &BTreeMap::new(),
        )
        .unwrap_err();
        assert_eq!(e.key(), Some("ebb.io/timezone"));
        assert!(e.to_string().contains("Mars/Base"), "{e}");
        assert!(
            FunctionSpec::from_annotations(
                "nightly",
                "shop",
                &ann("0 30 2 * * *", "Europe/Berlin"),
                &BTreeMap::new()
            )
            .unwrap()
            .is_some()
        );

        let err = Stack::parse(
            "functions:\n  - name: cron\n    url: http://x:1\n    schedule: \"*/5 * * *\"\n",
        )
        .unwrap_err();
        let first = &err.errors()[0];
        assert_eq!(first.function(), Some("cron"));
        assert_eq!(first.key(), Some("schedule"));
    }
}
