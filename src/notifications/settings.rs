//! `[notifications]`: where announcements go, how they are signed, retried and kept. One
//! block with its own validation, so it moves as one.

use std::fmt;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer};

use super::signing::{Signer, SigningSecret};

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotificationSettings {
    /// Where announcements are posted; empty: none is sent (they wait in the outbox).
    pub url: String,
    /// One or two `whsec_…` secrets, comma separated (two during a rotation).
    pub secret: Option<SecretString>,
    pub retry_schedule: RetrySchedule,
    /// How long delivered announcements are kept.
    pub retention_days: u32,
}

impl fmt::Debug for NotificationSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NotificationSettings")
            .field("url", &self.url)
            .field("secret", &self.secret.as_ref().map(|_| "…"))
            .field("retry_schedule", &self.retry_schedule)
            .field("retention_days", &self.retention_days)
            .finish()
    }
}

impl NotificationSettings {
    /// Whether announcements are delivered at all.
    pub fn enabled(&self) -> bool {
        !self.url.trim().is_empty()
    }

    pub fn retention(&self) -> Duration {
        Duration::from_secs(u64::from(self.retention_days) * 86_400)
    }

    /// The signing secrets; `None` when none is set (refused in production when the url is).
    pub fn signer(&self) -> Result<Option<Signer>, String> {
        let Some(raw) = &self.secret else {
            return Ok(None);
        };
        let secrets = (raw.expose_secret().split(','))
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(SigningSecret::parse)
            .collect::<Result<Vec<_>, _>>()
            .map_err(str::to_owned)?;
        match secrets.len() {
            0 => Ok(None),
            1 | 2 => Ok(Some(Signer::new(secrets))),
            _ => Err("lists more than two secrets (one, or two during a rotation)".into()),
        }
    }

    /// What is wrong, as (setting, problem) pairs. A problem never repeats a secret.
    pub fn problems(&self, production: bool) -> Vec<(&'static str, String)> {
        let mut problems = Vec::new();
        if self.enabled() {
            match url::Url::parse(self.url.trim()) {
                Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
                _ => problems.push(("notifications.url", "is not an http(s) URL".to_owned())),
            }
        }
        match self.signer() {
            Err(problem) => problems.push(("notifications.secret", problem)),
            Ok(None) if production && self.enabled() => problems.push((
                "notifications.secret",
                "is not set: in production announcements to notifications.url must be signed; \
                 set one whsec_… secret (base64 of at least 24 random bytes)"
                    .to_owned(),
            )),
            Ok(_) => {}
        }
        if !(1..=3650).contains(&self.retention_days) {
            problems.push((
                "notifications.retention_days",
                format!("must be 1 to 3650, not {}", self.retention_days),
            ));
        }
        problems
    }
}

/// The waits before each attempt: the first (usually `0s`) after the change, each next
/// after the previous attempt failed. After the last, the announcement is `failed`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetrySchedule(Vec<Duration>);

impl RetrySchedule {
    pub fn parse(raw: &str) -> Result<Self, String> {
        let steps = (raw.split(','))
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(parse_duration)
            .collect::<Result<Vec<_>, _>>()?;
        if steps.is_empty() || steps.len() > 20 {
            return Err("must list 1 to 20 waits, e.g. \"0s,5s,5m,30m,2h,5h,10h,10h\"".into());
        }
        if steps.iter().any(|d| *d > Duration::from_secs(86_400)) {
            return Err("must not wait more than 24h between attempts".into());
        }
        Ok(Self(steps))
    }

    /// How many attempts in all.
    pub fn attempts(&self) -> usize {
        self.0.len()
    }

    /// The wait before attempt `n` (0-based); `None` past the last.
    pub fn before_attempt(&self, n: usize) -> Option<Duration> {
        self.0.get(n).copied()
    }
}

impl<'de> Deserialize<'de> for RetrySchedule {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(deserializer)?;
        Self::parse(&raw).map_err(serde::de::Error::custom)
    }
}

/// `250ms`, `5s`, `5m`, `2h`.
fn parse_duration(raw: &str) -> Result<Duration, String> {
    let split = raw
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{raw:?} needs a unit (ms, s, m or h)"))?;
    let (number, unit) = raw.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{raw:?} is not a number with a unit (ms, s, m or h)"))?;
    let secs = |factor: u64| Duration::from_secs(n.saturating_mul(factor));
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(secs(1)),
        "m" => Ok(secs(60)),
        "h" => Ok(secs(3600)),
        _ => Err(format!("{raw:?} has an unknown unit (ms, s, m or h)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_default_schedule() {
        let s = RetrySchedule::parse("0s,5s,5m,30m,2h,5h,10h,10h").unwrap();
        assert_eq!(s.attempts(), 8);
        assert_eq!(s.before_attempt(0), Some(Duration::ZERO));
        assert_eq!(s.before_attempt(2), Some(Duration::from_secs(300)));
        assert_eq!(s.before_attempt(7), Some(Duration::from_secs(36_000)));
        assert_eq!(s.before_attempt(8), None);
        assert_eq!(
            RetrySchedule::parse("0s, 100ms").unwrap().before_attempt(1),
            Some(Duration::from_millis(100))
        );
    }

    fn settings(url: &str, secret: Option<&str>) -> NotificationSettings {
        NotificationSettings {
            url: url.into(),
            secret: secret.map(SecretString::from),
            retry_schedule: RetrySchedule::parse("0s").unwrap(),
            retention_days: 30,
        }
    }

    fn keys(problems: &[(&'static str, String)]) -> Vec<&'static str> {
        problems.iter().map(|(key, _)| *key).collect()
    }

    #[test]
    fn production_needs_a_secret_of_the_right_shape_when_the_url_is_set() {
        let url = "https://atlas.example/hooks/stripe";
        use base64::Engine as _;
        // Built at run time, so no secret-shaped literal sits in the source.
        let random_base64 = |bytes: usize| {
            let mut raw = vec![0u8; bytes];
            rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut raw);
            base64::engine::general_purpose::STANDARD.encode(raw)
        };
        let tail = random_base64(24);
        let good = format!("whsec_{tail}");
        let good = good.as_str();
        assert_eq!(
            keys(&settings(url, None).problems(true)),
            ["notifications.secret"]
        );
        assert!(
            settings(url, None).problems(false).is_empty(),
            "outside production: unsigned"
        );
        assert!(
            settings("", None).problems(true).is_empty(),
            "no url, nothing sent"
        );
        assert!(settings(url, Some(good)).problems(true).is_empty());
        let rotation = format!("{good},{good}");
        assert!(settings(url, Some(&rotation)).problems(true).is_empty());
        let three = format!("{good},{good},{good}");
        let short = format!("whsec_{}", random_base64(21));
        for bad in [short.as_str(), tail.as_str(), "whsec_not base64!", &three] {
            for production in [true, false] {
                let problems = settings(url, Some(bad)).problems(production);
                assert_eq!(keys(&problems), ["notifications.secret"], "{bad}");
                assert!(!problems[0].1.contains(&tail[..8]), "the secret is echoed");
            }
        }
        assert_eq!(
            keys(&settings("ftp://x", Some(good)).problems(true)),
            ["notifications.url"]
        );
    }

    #[test]
    fn refuses_malformed_schedules() {
        for bad in ["", "5", "5x", "s", "1s,25h", "-1s"] {
            assert!(RetrySchedule::parse(bad).is_err(), "{bad}");
        }
    }
}
