//! Compiling the `anomalies` section: each kind of rule checked field by field, every error
//! naming its field.

use super::*;

/// A rule's zone: a fixed offset (`+08:00`, at most 14 hours) or `UTC`; never a zone name
/// (the rule names its offset, nothing is looked up).
fn offset(field: &str, tz: &str) -> Result<i64, ConfigError> {
    if tz == "UTC" || tz == "Z" {
        return Ok(0);
    }
    timeutil::parse_offset(tz)
        .filter(|o| o.abs() <= 14 * 3600)
        .ok_or_else(|| {
            ConfigError::new(
                field,
                format!("{tz:?} is not a UTC offset like +08:00, or UTC"),
            )
        })
}

/// Minutes after midnight of `HH:MM`, before 24:00.
fn clock(s: &str) -> Option<u32> {
    timeutil::parse_hhmm(s).filter(|m| *m < 24 * 60)
}

const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

/// What every rule is checked against: rule ids unique across kinds, and the APIs and apps the
/// policy defines.
struct Names<'a, A, P> {
    ids: Vec<&'a str>,
    api_exists: A,
    app_exists: P,
}

impl<'a, A: Fn(&str) -> bool, P: Fn(&str) -> bool> Names<'a, A, P> {
    /// A rule id: 1 to 64 of `A-Z a-z 0-9 . _ -`, used once.
    fn id(&mut self, f: &str, id: &'a str) -> Result<(), ConfigError> {
        let named = !id.is_empty()
            && id.len() <= 64
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !named || self.ids.contains(&id) {
            return Err(ConfigError::new(
                format!("{f}.id"),
                format!("rule id {id:?} is not 1 to 64 of A-Z a-z 0-9 . _ -, or is used twice"),
            ));
        }
        self.ids.push(id);
        Ok(())
    }

    /// The APIs and apps a rule names exist.
    fn known(&self, f: &str, apis: &[String], apps: &[String]) -> Result<(), ConfigError> {
        if let Some(a) = apis.iter().find(|a| !(self.api_exists)(a)) {
            return Err(ConfigError::new(
                format!("{f}.apis"),
                format!("unknown API {a:?}"),
            ));
        }
        if let Some(a) = apps.iter().find(|a| !(self.app_exists)(a)) {
            return Err(ConfigError::new(
                format!("{f}.apps"),
                format!("unknown app {a:?}"),
            ));
        }
        Ok(())
    }
}

fn range_list(field: String, ranges: &[String]) -> Result<Vec<Cidr>, ConfigError> {
    ranges
        .iter()
        .map(|r| Cidr::parse(r).map_err(|e| ConfigError::new(field.clone(), format!("{r:?}: {e}"))))
        .collect()
}

impl RawAnomalies {
    /// Compiles the rules; `apis` and `apps` are the ids the policy defines, `bans` its
    /// automatic bans (a blocking signature-failure rule bans with them).
    pub fn compile(
        &self,
        api_exists: impl Fn(&str) -> bool,
        app_exists: impl Fn(&str) -> bool,
        bans: Option<&BanSettings>,
    ) -> Result<Anomalies, ConfigError> {
        let mut names = Names {
            ids: Vec::new(),
            api_exists,
            app_exists,
        };
        let mut out = Anomalies::default();
        for (i, h) in self.working_hours.iter().enumerate() {
            let f = format!("anomalies.working_hours[{i}]");
            names.id(&f, &h.id)?;
            names.known(&f, &h.apis, &h.apps)?;
            out.hours.push(h.compile(&f)?);
        }
        for (i, s) in self.usual_sources.iter().enumerate() {
            let f = format!("anomalies.usual_sources[{i}]");
            names.id(&f, &s.id)?;
            if !(names.app_exists)(&s.app) {
                return Err(ConfigError::new(
                    format!("{f}.app"),
                    format!("unknown app {:?}", s.app),
                ));
            }
            out.sources.push(s.compile(&f)?);
        }
        for (i, b) in self.bulk_pulls.iter().enumerate() {
            let f = format!("anomalies.bulk_pulls[{i}]");
            names.id(&f, &b.id)?;
            names.known(&f, &b.apis, &b.apps)?;
            out.bulk.push(b.compile(&f)?);
        }
        for (i, n) in self.new_sources.iter().enumerate() {
            let f = format!("anomalies.new_sources[{i}]");
            names.id(&f, &n.id)?;
            names.known(&f, &[], &n.apps)?;
            out.new_sources.push(n.compile(&f)?);
        }
        for (i, k) in self.signature_failures.iter().enumerate() {
            let f = format!("anomalies.signature_failures[{i}]");
            names.id(&f, &k.id)?;
            names.known(&f, &[], &k.apps)?;
            out.key_failures.push(k.compile(&f, bans)?);
        }
        Ok(out)
    }
}

impl RawHours {
    fn compile(&self, f: &str) -> Result<Hours, ConfigError> {
        let days = match &self.days {
            None => 0b001_1111,
            Some(list) => {
                let mut bits = 0u8;
                for d in list {
                    let n = DAYS.iter().position(|x| x == d).ok_or_else(|| {
                        ConfigError::new(format!("{f}.days"), format!("{d:?} is not mon .. sun"))
                    })?;
                    bits |= 1 << n;
                }
                if bits == 0 {
                    return Err(ConfigError::new(
                        format!("{f}.days"),
                        "no day: every call would be an anomaly",
                    ));
                }
                bits
            }
        };
        let from =
            clock(&self.from).ok_or_else(|| ConfigError::new(format!("{f}.from"), "not HH:MM"))?;
        let to = clock(&self.to).ok_or_else(|| ConfigError::new(format!("{f}.to"), "not HH:MM"))?;
        if from == to {
            return Err(ConfigError::new(
                format!("{f}.to"),
                "from and to are the same time",
            ));
        }
        Ok(Hours {
            id: self.id.clone(),
            offset_seconds: offset(&format!("{f}.timezone"), &self.timezone)?,
            days,
            from,
            to,
            apis: self.apis.clone(),
            apps: self.apps.clone(),
            action: self.action,
        })
    }
}

impl RawSources {
    fn compile(&self, f: &str) -> Result<Sources, ConfigError> {
        if self.ranges.is_empty() {
            return Err(ConfigError::new(
                format!("{f}.ranges"),
                "no range: every call would be an anomaly",
            ));
        }
        Ok(Sources {
            id: self.id.clone(),
            app: self.app.clone(),
            ranges: range_list(format!("{f}.ranges"), &self.ranges)?,
            action: self.action,
        })
    }
}

impl RawBulk {
    fn compile(&self, f: &str) -> Result<Bulk, ConfigError> {
        if !(1..=86_400).contains(&self.window_seconds) {
            return Err(ConfigError::new(
                format!("{f}.window_seconds"),
                "must be between 1 and 86400",
            ));
        }
        if self.max_calls.is_none() && self.max_response_bytes.is_none() {
            return Err(ConfigError::new(
                f,
                "names max_calls, max_response_bytes or both",
            ));
        }
        if self.max_calls == Some(0) || self.max_response_bytes == Some(0) {
            return Err(ConfigError::new(f, "a maximum of 0 refuses every call"));
        }
        Ok(Bulk {
            id: self.id.clone(),
            apps: self.apps.clone(),
            apis: self.apis.clone(),
            window: self.window_seconds,
            max_calls: self.max_calls,
            max_bytes: self.max_response_bytes,
            action: self.action,
        })
    }
}

impl RawNewSources {
    fn compile(&self, f: &str) -> Result<NewSources, ConfigError> {
        let learn_until = match &self.learn_until {
            None => 0,
            Some(t) => timeutil::parse_rfc3339(t).ok_or_else(|| {
                ConfigError::new(
                    format!("{f}.learn_until"),
                    "must be an RFC 3339 time with an offset",
                )
            })?,
        };
        let approved = range_list(format!("{f}.approved"), &self.approved)?;
        if !(1..=1024).contains(&self.max_sources) {
            return Err(ConfigError::new(
                format!("{f}.max_sources"),
                "must be between 1 and 1024",
            ));
        }
        if !(1..=3650).contains(&self.forget_days) {
            return Err(ConfigError::new(
                format!("{f}.forget_days"),
                "must be between 1 and 3650",
            ));
        }
        Ok(NewSources {
            id: self.id.clone(),
            apps: self.apps.clone(),
            learn_until,
            approved,
            max: self.max_sources,
            forget: u64::from(self.forget_days) * 86_400,
            action: self.action,
        })
    }
}

impl RawKeyFailures {
    fn compile(&self, f: &str, bans: Option<&BanSettings>) -> Result<KeyFailures, ConfigError> {
        if self.threshold == 0 {
            return Err(ConfigError::new(
                format!("{f}.threshold"),
                "must be at least 1",
            ));
        }
        if !(1..=86_400).contains(&self.window_seconds) {
            return Err(ConfigError::new(
                format!("{f}.window_seconds"),
                "must be between 1 and 86400",
            ));
        }
        if self
            .ban_seconds
            .is_some_and(|b| !(1..=30 * 86_400).contains(&b))
        {
            return Err(ConfigError::new(
                format!("{f}.ban_seconds"),
                "must be between 1 and 2592000",
            ));
        }
        let ban_seconds = match (self.action, bans) {
            (RuleAction::Block, None) => {
                return Err(ConfigError::new(
                    format!("{f}.action"),
                    "block bans the failing source: the policy needs a bans section",
                ))
            }
            (_, b) => self
                .ban_seconds
                .or(b.map(|b| b.ban_seconds))
                .unwrap_or(3600),
        };
        if self.action == RuleAction::Alert && self.ban_seconds.is_some() {
            return Err(ConfigError::new(
                format!("{f}.ban_seconds"),
                "only with action: block",
            ));
        }
        Ok(KeyFailures {
            id: self.id.clone(),
            apps: self.apps.clone(),
            threshold: self.threshold,
            window: self.window_seconds,
            ban_seconds,
            action: self.action,
        })
    }
}
