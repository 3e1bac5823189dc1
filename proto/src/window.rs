//! Delivery windows: `"Mon-Fri 02:00-04:00"`, `"Tue,Thu 22:00-02:00"` (across midnight),
//! `"Daily 01:00-05:00"`, judged in civil time of an IANA time zone (so DST is handled the way
//! people read the policy: "Sat 02:00" is 02:00 on the wall clock whatever the UTC offset).

use crate::error::{Rejection, Result};
use jiff::civil::{Date, Time, Weekday};
use jiff::tz::TimeZone;
use jiff::{Timestamp, Zoned};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

const DAYS: [(&str, Weekday); 7] = [
    ("Mon", Weekday::Monday),
    ("Tue", Weekday::Tuesday),
    ("Wed", Weekday::Wednesday),
    ("Thu", Weekday::Thursday),
    ("Fri", Weekday::Friday),
    ("Sat", Weekday::Saturday),
    ("Sun", Weekday::Sunday),
];

/// One recurring window: the days it *starts* on, and its start and end wall-clock times.
/// An end at or before the start means the window runs past midnight into the next day.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Window {
    days: u8,
    start: (i8, i8),
    end: (i8, i8),
}

fn day_bit(w: Weekday) -> u8 {
    1 << (w.to_monday_zero_offset() as u8)
}

fn parse_hm(s: &str) -> Option<(i8, i8)> {
    let (h, m) = s.split_once(':')?;
    if h.len() != 2 || m.len() != 2 {
        return None;
    }
    let h: i8 = h.parse().ok()?;
    let m: i8 = m.parse().ok()?;
    ((0..=23).contains(&h) && (0..=59).contains(&m) || (h == 24 && m == 0)).then_some((h, m))
}

impl Window {
    /// Parse one window.
    pub fn parse(s: &str) -> Result<Window> {
        let bad = |why: &str| {
            Rejection::malformed(format!(
                "window {:?}: {why} (write e.g. \"Mon-Fri 02:00-04:00\" or \"Tue,Thu 22:00-02:00\")",
                crate::keys::truncate(s, 60)
            ))
        };
        if s.len() > 64 {
            return Err(bad("too long"));
        }
        let (days_s, times_s) = s
            .trim()
            .split_once(' ')
            .ok_or_else(|| bad("missing times"))?;
        let mut days = 0u8;
        if days_s.eq_ignore_ascii_case("daily") || days_s == "*" {
            days = 0x7f;
        } else {
            for part in days_s.split(',') {
                let idx = |name: &str| DAYS.iter().position(|(n, _)| n.eq_ignore_ascii_case(name));
                match part.split_once('-') {
                    Some((a, b)) => {
                        let a = idx(a).ok_or_else(|| bad("unknown day"))?;
                        let b = idx(b).ok_or_else(|| bad("unknown day"))?;
                        let mut i = a;
                        loop {
                            days |= 1 << i;
                            if i == b {
                                break;
                            }
                            i = (i + 1) % 7;
                        }
                    }
                    None => days |= 1 << idx(part).ok_or_else(|| bad("unknown day"))?,
                }
            }
        }
        let (a, b) = times_s
            .trim()
            .split_once('-')
            .ok_or_else(|| bad("times must be HH:MM-HH:MM"))?;
        let start = parse_hm(a).ok_or_else(|| bad("bad start time"))?;
        let end = parse_hm(b).ok_or_else(|| bad("bad end time"))?;
        if start == end {
            return Err(bad("start and end are the same"));
        }
        if start == (24, 0) {
            return Err(bad("a window cannot start at 24:00"));
        }
        Ok(Window { days, start, end })
    }

    fn crosses_midnight(&self) -> bool {
        self.end <= self.start
    }

    /// The window's `[open, close)` instants for the occurrence starting on civil `date`, if it
    /// starts on that weekday.
    fn occurrence(&self, date: Date, tz: &TimeZone) -> Option<(Timestamp, Timestamp)> {
        if self.days & day_bit(date.weekday()) == 0 {
            return None;
        }
        let at = |d: Date, (h, m): (i8, i8)| -> Option<Timestamp> {
            let (d, h) = if h == 24 {
                (d.tomorrow().ok()?, 0)
            } else {
                (d, h)
            };
            let t = Time::new(h, m, 0, 0).ok()?;
            // "compatible" disambiguation: a time in a spring-forward gap moves later, a time
            // in a fall-back fold takes the first occurrence.
            Some(d.to_datetime(t).to_zoned(tz.clone()).ok()?.timestamp())
        };
        let open = at(date, self.start)?;
        let end_date = if self.crosses_midnight() {
            date.tomorrow().ok()?
        } else {
            date
        };
        let close = at(end_date, self.end)?;
        (close > open).then_some((open, close))
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.days == 0x7f {
            f.write_str("Daily")?;
        } else {
            let names: Vec<&str> = DAYS
                .iter()
                .enumerate()
                .filter(|(i, _)| self.days & (1 << i) != 0)
                .map(|(_, (n, _))| *n)
                .collect();
            f.write_str(&names.join(","))?;
        }
        write!(
            f,
            " {:02}:{:02}-{:02}:{:02}",
            self.start.0, self.start.1, self.end.0, self.end.1
        )
    }
}

impl Serialize for Window {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Window {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Window, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Window::parse(&s).map_err(|e| serde::de::Error::custom(e.detail))
    }
}

/// A set of windows in one time zone. No windows means "always open".
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    windows: Vec<Window>,
    tz: TimeZone,
}

impl Schedule {
    /// Windows in the IANA zone `tz` (e.g. `Europe/Berlin`; `UTC` for UTC).
    pub fn new(windows: Vec<Window>, tz: &str) -> Result<Schedule> {
        let tz = TimeZone::get(tz)
            .map_err(|e| Rejection::malformed(format!("time zone {tz:?}: {e}")))?;
        Ok(Schedule { windows, tz })
    }

    /// Windows in an already-resolved zone.
    pub fn with_zone(windows: Vec<Window>, tz: TimeZone) -> Schedule {
        Schedule { windows, tz }
    }

    /// Always open.
    pub fn always() -> Schedule {
        Schedule {
            windows: Vec::new(),
            tz: TimeZone::UTC,
        }
    }

    /// The windows.
    pub fn windows(&self) -> &[Window] {
        &self.windows
    }

    /// Whether `now` falls inside a window.
    pub fn is_open(&self, now: Timestamp) -> bool {
        self.open_interval(now).is_some_and(|(open, _)| open <= now)
    }

    /// If `now` is inside a window, `Some((open, close))` of that occurrence; otherwise the
    /// next occurrence to open (with `open > now`). `None` only when there are no windows... in
    /// which case [`Schedule::is_open`] is true; see [`Schedule::next_open`].
    fn open_interval(&self, now: Timestamp) -> Option<(Timestamp, Timestamp)> {
        if self.windows.is_empty() {
            return Some((now, Timestamp::MAX));
        }
        let today = Zoned::new(now, self.tz.clone()).date();
        let mut best: Option<(Timestamp, Timestamp)> = None;
        // Yesterday covers windows that started before midnight; eight days ahead covers a
        // weekly window that just closed.
        let mut day = today.yesterday().ok()?;
        for _ in 0..10 {
            for w in &self.windows {
                if let Some((open, close)) = w.occurrence(day, &self.tz) {
                    if open <= now && now < close {
                        return Some((open, close));
                    }
                    if open > now && best.is_none_or(|(b, _)| open < b) {
                        best = Some((open, close));
                    }
                }
            }
            day = day.tomorrow().ok()?;
        }
        best
    }

    /// When the schedule next admits work: `now` itself if a window is open.
    pub fn next_open(&self, now: Timestamp) -> Option<Timestamp> {
        self.open_interval(now).map(|(open, _)| open.max(now))
    }

    /// When the window open at `now` closes, if one is open.
    pub fn closes_at(&self, now: Timestamp) -> Option<Timestamp> {
        self.open_interval(now)
            .filter(|(open, _)| *open <= now)
            .map(|(_, close)| close)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn sched(ws: &[&str], tz: &str) -> Schedule {
        Schedule::new(ws.iter().map(|w| Window::parse(w).unwrap()).collect(), tz).unwrap()
    }

    #[test]
    fn parses_and_displays() {
        for (input, shown) in [
            ("Mon-Fri 02:00-04:00", "Mon,Tue,Wed,Thu,Fri 02:00-04:00"),
            ("Tue,Thu 22:00-02:00", "Tue,Thu 22:00-02:00"),
            ("Daily 01:00-05:00", "Daily 01:00-05:00"),
            ("Sat-Mon 00:00-24:00", "Mon,Sat,Sun 00:00-24:00"),
        ] {
            let w = Window::parse(input).unwrap();
            assert_eq!(w.to_string(), shown);
            assert_eq!(Window::parse(shown).unwrap(), w);
        }
    }

    #[test]
    fn rejects_bad_windows() {
        for s in [
            "",
            "Mon",
            "Mon 02:00",
            "Xyz 02:00-03:00",
            "Mon 25:00-26:00",
            "Mon 02:00-02:00",
            "Mon 2:00-3:00",
            "Mon 02:60-03:00",
            "Mon 24:00-01:00",
        ] {
            assert!(Window::parse(s).is_err(), "{s:?} accepted");
        }
    }

    #[test]
    fn weekday_window_in_utc() {
        let s = sched(&["Mon-Fri 02:00-04:00"], "UTC");
        // 2026-11-23 is a Monday.
        assert!(!s.is_open(ts("2026-11-23T01:59:59Z")));
        assert!(s.is_open(ts("2026-11-23T02:00:00Z")));
        assert!(s.is_open(ts("2026-11-23T03:59:59Z")));
        assert!(!s.is_open(ts("2026-11-23T04:00:00Z")));
        // Saturday: closed; next open Monday 02:00.
        assert!(!s.is_open(ts("2026-11-28T03:00:00Z")));
        assert_eq!(
            s.next_open(ts("2026-11-28T03:00:00Z")),
            Some(ts("2026-11-30T02:00:00Z"))
        );
    }

    #[test]
    fn window_across_midnight_belongs_to_its_start_day() {
        let s = sched(&["Tue,Thu 22:00-02:00"], "UTC");
        // Tuesday 2026-11-24 23:00 and Wednesday 01:00 are inside; Wednesday 22:30 is not.
        assert!(s.is_open(ts("2026-11-24T23:00:00Z")));
        assert!(s.is_open(ts("2026-11-25T01:00:00Z")));
        assert!(!s.is_open(ts("2026-11-25T02:00:00Z")));
        assert!(!s.is_open(ts("2026-11-25T22:30:00Z")));
        // Monday 01:00 is not inside (Sunday is not a start day).
        assert!(!s.is_open(ts("2026-11-23T01:00:00Z")));
        assert_eq!(
            s.closes_at(ts("2026-11-24T23:00:00Z")),
            Some(ts("2026-11-25T02:00:00Z"))
        );
    }

    #[test]
    fn berlin_window_follows_wall_clock_across_dst() {
        let s = sched(&["Sat 02:00-04:00"], "Europe/Berlin");
        // Saturday 2026-10-24 is still CEST (+02:00): the window is 00:00-02:00 UTC.
        assert!(s.is_open(ts("2026-10-24T00:30:00Z")));
        assert!(!s.is_open(ts("2026-10-24T02:30:00Z")));
        // DST ends Sunday 2026-10-25; Saturday 2026-10-31 is CET (+01:00): 01:00-03:00 UTC.
        assert!(!s.is_open(ts("2026-10-31T00:30:00Z")));
        assert!(s.is_open(ts("2026-10-31T02:30:00Z")));
        assert_eq!(
            s.next_open(ts("2026-10-24T03:00:00Z")),
            Some(ts("2026-10-31T01:00:00Z"))
        );
    }

    #[test]
    fn window_in_spring_forward_gap_opens_after_the_gap() {
        // 2026-03-29 in Berlin: 02:00 jumps to 03:00. A 02:00-04:00 Sunday window opens at 03:00
        // local (01:00 UTC) and closes at 04:00 local (02:00 UTC).
        let s = sched(&["Sun 02:00-04:00"], "Europe/Berlin");
        assert!(!s.is_open(ts("2026-03-29T00:59:00Z")));
        assert!(s.is_open(ts("2026-03-29T01:00:00Z")));
        assert!(!s.is_open(ts("2026-03-29T02:00:00Z")));
    }

    #[test]
    fn no_windows_is_always_open() {
        let s = Schedule::always();
        assert!(s.is_open(ts("2026-01-01T00:00:00Z")));
        assert_eq!(
            s.next_open(ts("2026-01-01T00:00:00Z")),
            Some(ts("2026-01-01T00:00:00Z"))
        );
    }

    #[test]
    fn unknown_time_zone_is_malformed() {
        assert!(Schedule::new(vec![], "Mars/Olympus").is_err());
    }
}
