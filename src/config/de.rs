//! How a setting's text becomes its type. An error here is a message without the key:
//! `config` adds the key, and the load names the layer that set it.

use std::fmt;
use std::num::NonZeroU32;
use std::time::Duration;

use axum::http::HeaderValue;
use serde::de::Error as _;
use serde::{Deserialize, Deserializer};

use crate::domain::Resource;
use crate::proxy::Allowlist;

/// A `_ms` setting: an integer of milliseconds.
pub(super) fn millis<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    non_negative(deserializer, "milliseconds").map(Duration::from_millis)
}

/// A `_secs` setting: an integer of seconds.
pub(super) fn secs<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    non_negative(deserializer, "seconds").map(Duration::from_secs)
}

/// Read signed, so that `-5` is refused in words rather than as a type mismatch.
fn non_negative<'de, D: Deserializer<'de>>(deserializer: D, unit: &str) -> Result<u64, D::Error> {
    let value = i64::deserialize(deserializer)?;
    u64::try_from(value)
        .map_err(|_| D::Error::custom(format!("must be a number of {unit}, not {value}")))
}

/// A rate or count from 1 to `MAX`, refused with the words of the other range checks.
pub(super) fn positive<'de, D: Deserializer<'de>, const MAX: u32>(
    deserializer: D,
) -> Result<NonZeroU32, D::Error> {
    let value = i64::deserialize(deserializer)?;
    u32::try_from(value)
        .ok()
        .filter(|v| *v <= MAX)
        .and_then(NonZeroU32::new)
        .ok_or_else(|| D::Error::custom(format!("must be 1 to {MAX}, not {value}")))
}

/// `stripe.required_resources`: the domain's resources, by name.
pub(super) fn resources<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Vec<Resource>, D::Error> {
    list(deserializer)?
        .iter()
        .map(|name| Resource::parse(name))
        .collect::<Result<_, _>>()
        .map_err(|e| D::Error::custom(format!("lists a resource Atlas does not know: {e}")))
}

/// `proxy.allowed`: the proxy's allowlist.
pub(super) fn allowlist<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Allowlist, D::Error> {
    Allowlist::parse(&list(deserializer)?).map_err(D::Error::custom)
}

/// `proxy.stripe_versions`: each a Stripe API version (`YYYY-MM-DD`, optionally `.name`).
pub(super) fn stripe_versions<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Vec<String>, D::Error> {
    let versions = list(deserializer)?;
    match versions
        .iter()
        .find(|v| !crate::proxy::is_stripe_version(v))
    {
        Some(bad) => Err(D::Error::custom(format!(
            "{bad:?} is not a Stripe version (YYYY-MM-DD, optionally .name)"
        ))),
        None => Ok(versions),
    }
}

/// `server.cors_allowed_origins`: each an origin exactly as a browser sends it.
pub(super) fn origins<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Vec<HeaderValue>, D::Error> {
    list(deserializer)?
        .iter()
        .map(|origin| {
            if let Some(problem) = super::public_url::origin_problem(origin) {
                return Err(D::Error::custom(problem));
            }
            // An origin that parsed as a URL and serialises to itself is ASCII.
            HeaderValue::from_str(origin).map_err(D::Error::custom)
        })
        .collect()
}

/// A list setting: an array in a file, or one string split on ',' (a variable). Entries are
/// trimmed and empty ones dropped, so an empty variable is an empty list.
pub(super) fn list<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    struct ListVisitor;
    impl<'de> serde::de::Visitor<'de> for ListVisitor {
        type Value = Vec<String>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a list of strings, or one comma-separated string")
        }
        fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<Self::Value, E> {
            Ok(value
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect())
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Self::Value, A::Error> {
            let mut items = Vec::new();
            while let Some(item) = seq.next_element::<String>()? {
                let item = item.trim();
                if !item.is_empty() {
                    items.push(item.to_owned());
                }
            }
            Ok(items)
        }
    }
    deserializer.deserialize_any(ListVisitor)
}
