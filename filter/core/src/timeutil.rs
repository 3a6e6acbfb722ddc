//! Calendar arithmetic for grant and credential validity (PERM-5, OPS-2): RFC 3339
//! timestamps, dates, weekdays and local time of day in a fixed-offset zone. No time-zone database in the filter: zones are a
//! short built-in table of zones without daylight saving (the markets this gateway serves), or
//! an explicit `+08:00` offset; anything else is refused at validation, never guessed.

/// Seconds east of UTC for a zone name or `+HH:MM` / `-HH:MM`.
pub fn zone_offset(name: &str) -> Option<i64> {
    let fixed = match name {
        "UTC" | "Etc/UTC" | "Z" => Some(0),
        "Asia/Shanghai" | "Asia/Chongqing" | "Asia/Harbin" | "PRC" | "Asia/Hong_Kong"
        | "Asia/Macau" | "Asia/Taipei" | "Asia/Singapore" | "Asia/Kuala_Lumpur" => Some(8 * 3600),
        "Asia/Tokyo" | "Asia/Seoul" => Some(9 * 3600),
        _ => None,
    };
    fixed.or_else(|| parse_offset(name))
}

/// Seconds east of UTC for `+HH:MM` / `-HH:MM` (hours up to 14).
pub fn parse_offset(s: &str) -> Option<i64> {
    let (sign, rest) = match s.as_bytes().first()? {
        b'+' => (1, s.get(1..)?),
        b'-' => (-1, s.get(1..)?),
        _ => return None,
    };
    let (h, m) = rest.split_once(':')?;
    if h.len() != 2 || m.len() != 2 {
        return None;
    }
    let h: i64 = h.parse().ok()?;
    let m: i64 = m.parse().ok()?;
    if h > 14 || m > 59 {
        return None;
    }
    Some(sign * (h * 3600 + m * 60))
}

/// Days since 1970-01-01 for a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        _ => 28,
    }
}

fn num(s: &str, len: usize) -> Option<i64> {
    if s.len() != len || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// `YYYY-MM-DD` to days since the epoch.
pub fn parse_date(s: &str) -> Option<i64> {
    let mut it = s.split('-');
    let (y, m, d) = (
        num(it.next()?, 4)?,
        num(it.next()?, 2)?,
        num(it.next()?, 2)?,
    );
    if it.next().is_some() || !(1..=12).contains(&m) || d < 1 || d > days_in_month(y, m) {
        return None;
    }
    Some(days_from_civil(y, m, d))
}

/// RFC 3339 date-time with an explicit offset (`2026-01-01T09:30:00+08:00`, `...Z`) to unix seconds.
/// A validity period: from `not_before` to `not_after`, both inclusive, either open (grants,
/// PERM-5; credentials, OPS-2).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Period {
    pub not_before: Option<u64>,
    pub not_after: Option<u64>,
}

/// Where `now` lies outside a period, and the bound it is past.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outside {
    Before(u64),
    After(u64),
}

impl Period {
    /// From a policy's `not_before` / `not_after` (RFC 3339 with an offset), for the object at
    /// `field`: each optional, and `not_after` after `not_before`.
    pub fn parse(
        field: &str,
        not_before: &Option<String>,
        not_after: &Option<String>,
    ) -> Result<Period, crate::error::ConfigError> {
        let ts = |name: &str, v: &Option<String>| {
            v.as_ref()
                .map(|s| {
                    parse_rfc3339(s).ok_or_else(|| {
                        crate::error::ConfigError::new(
                            format!("{field}.{name}"),
                            "must be an RFC 3339 time with an offset, like 2026-01-01T00:00:00+08:00",
                        )
                    })
                })
                .transpose()
        };
        let (a, b) = (ts("not_before", not_before)?, ts("not_after", not_after)?);
        if let (Some(a), Some(b)) = (a, b) {
            if a >= b {
                return Err(crate::error::ConfigError::new(
                    format!("{field}.not_after"),
                    "must be after not_before",
                ));
            }
        }
        Ok(Period {
            not_before: a,
            not_after: b,
        })
    }

    /// None while `now` is within the period.
    pub fn outside(&self, now: u64) -> Option<Outside> {
        if let Some(nb) = self.not_before.filter(|nb| now < *nb) {
            return Some(Outside::Before(nb));
        }
        self.not_after.filter(|na| now > *na).map(Outside::After)
    }
}

pub fn parse_rfc3339(s: &str) -> Option<u64> {
    let (date, rest) = s.split_once(['T', 't'])?;
    let days = parse_date(date)?;
    let (clock, offset) = if let Some(c) = rest.strip_suffix(['Z', 'z']) {
        (c, 0)
    } else {
        let i = rest.rfind(['+', '-'])?;
        (rest.get(..i)?, parse_offset(rest.get(i..)?)?)
    };
    let clock = clock.split_once('.').map_or(clock, |(c, _)| c);
    let mut it = clock.split(':');
    let (h, mi, se) = (
        num(it.next()?, 2)?,
        num(it.next()?, 2)?,
        num(it.next()?, 2)?,
    );
    if it.next().is_some() || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    let t = days * 86400 + h * 3600 + mi * 60 + se - offset;
    u64::try_from(t).ok()
}

/// `HH:MM` to minutes after midnight; `24:00` is allowed as the end of a day.
pub fn parse_hhmm(s: &str) -> Option<u32> {
    let (h, m) = s.split_once(':')?;
    let (h, m) = (num(h, 2)?, num(m, 2)?);
    if m > 59 || h > 24 || (h == 24 && m != 0) {
        return None;
    }
    u32::try_from(h * 60 + m).ok()
}

/// Local weekday (0 = Monday) and minute of the day for a unix time in a fixed-offset zone.
pub fn local_weekday_minute(now: u64, offset: i64) -> (u32, u32) {
    let t = now as i64 + offset;
    let days = t.div_euclid(86400);
    let minute = (t.rem_euclid(86400) / 60) as u32;
    // 1970-01-01 was a Thursday (3 when Monday is 0)
    let weekday = (days + 3).rem_euclid(7) as u32;
    (weekday, minute)
}

/// The calendar day (days since the epoch) and month (`year * 12 + month - 1`) of a unix time
/// in a fixed-offset zone, and the unix times at which that day and that month end: the
/// periods of a contract's quota (RL-1).
pub fn local_day_month(now: u64, offset: i64) -> (u64, u64, u64, u64) {
    let t = now as i64 + offset;
    let days = t.div_euclid(86400);
    let day_end = (days + 1) * 86400 - offset;
    let (y, m) = civil_year_month(days);
    let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    let month_end = days_from_civil(ny, nm, 1) * 86400 - offset;
    let month = y * 12 + m - 1;
    (
        days.max(0) as u64,
        month.max(0) as u64,
        day_end.max(0) as u64,
        month_end.max(0) as u64,
    )
}

/// Year and month (1-12) of a day since the epoch (the inverse of `days_from_civil`).
fn civil_year_month(days: i64) -> (i64, i64) {
    let z = days + 719468;
    let era = if z >= 0 { z } else { z - 146096 } / 146097;
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quota_periods_follow_the_local_calendar() {
        let cst = 8 * 3600;
        // 2026-01-31T23:59:59+08:00: still January 31st in Shanghai
        let t = parse_rfc3339("2026-01-31T23:59:59+08:00").unwrap();
        let (day, month, day_end, month_end) = local_day_month(t, cst);
        assert_eq!(day as i64, days_from_civil(2026, 1, 31));
        assert_eq!(month, 2026 * 12);
        assert_eq!(day_end, t + 1);
        assert_eq!(month_end, t + 1);
        // a second later: February 1st, a new day and a new month
        let (day2, month2, _, month_end2) = local_day_month(t + 1, cst);
        assert_eq!(day2, day + 1);
        assert_eq!(month2, month + 1);
        assert_eq!(
            month_end2,
            parse_rfc3339("2026-03-01T00:00:00+08:00").unwrap()
        );
        // December rolls into the next year
        let dec = parse_rfc3339("2026-12-15T12:00:00Z").unwrap();
        let (_, m, _, end) = local_day_month(dec, 0);
        assert_eq!(m, 2026 * 12 + 11);
        assert_eq!(end, parse_rfc3339("2027-01-01T00:00:00Z").unwrap());
    }

    #[test]
    fn rfc3339() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_rfc3339("2026-11-29T22:00:00Z"), Some(1_795_989_600));
        assert_eq!(
            parse_rfc3339("2026-11-30T06:00:00+08:00"),
            Some(1_795_989_600)
        );
        assert_eq!(
            parse_rfc3339("2026-11-29T17:00:00-05:00"),
            Some(1_795_989_600)
        );
        assert_eq!(
            parse_rfc3339("2026-11-29T22:00:00.250Z"),
            Some(1_795_989_600)
        );
        for bad in [
            "2026-11-29",
            "2026-02-30T00:00:00Z",
            "2026-11-29T25:00:00Z",
            "2026-11-29T22:00:00",
            "x",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
        assert_eq!(parse_date("2024-02-29"), Some(days_from_civil(2024, 2, 29)));
        assert_eq!(parse_date("2023-02-29"), None);
    }

    #[test]
    fn local_time_in_shanghai() {
        let off = zone_offset("Asia/Shanghai").unwrap();
        // 2026-11-30 is a Monday; 01:30 UTC is 09:30 in Shanghai.
        let t = parse_rfc3339("2026-11-30T01:30:00Z").unwrap();
        assert_eq!(local_weekday_minute(t, off), (0, 9 * 60 + 30));
        // Sunday 23:00 UTC is already Monday 07:00 in Shanghai
        let t = parse_rfc3339("2026-11-29T23:00:00Z").unwrap();
        assert_eq!(local_weekday_minute(t, off), (0, 7 * 60));
        assert_eq!(zone_offset("-03:30"), Some(-(3 * 3600 + 1800)));
        assert_eq!(zone_offset("Europe/London"), None);
        assert_eq!(parse_hhmm("24:00"), Some(1440));
        assert_eq!(parse_hhmm("9:30"), None);
    }
}
