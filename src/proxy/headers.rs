//! Which of a caller's headers reach Stripe. A charging service uses Stripe's official SDK
//! unchanged, so it sends what the SDK sends; of that only two headers concern Stripe's
//! answer to this caller and pass:
//!
//! - `Stripe-Version`, when well formed (`YYYY-MM-DD`, optionally `.name`) and, when
//!   `proxy.stripe_versions` lists any, one of them. It shapes only the caller's own objects
//!   and grants nothing; without one the pinned `stripe.api_version` is sent.
//! - `Idempotency-Key`, so an SDK's retry of a POST never creates a second object.
//!
//! `Stripe-Account` and `Stripe-Context` act on another account than the tenant's: refused
//! by name rather than dropped, since a caller sending them expects that other account.
//! Everything else (SDK telemetry such as `X-Stripe-Client-User-Agent` and
//! `X-Stripe-Client-Telemetry`, the caller's `Authorization`, `User-Agent`) stays here.

use axum::http::HeaderMap;

/// Headers naming another account than the tenant's.
const OTHER_ACCOUNT: [&str; 2] = ["Stripe-Account", "Stripe-Context"];

/// Stripe's longest idempotency key.
const IDEMPOTENCY_KEY_MAX: usize = 255;

/// What of the caller's headers is forwarded.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct CallerHeaders {
    /// The caller's `Stripe-Version`; `None` sends the pinned one.
    pub stripe_version: Option<String>,
    /// The caller's `Idempotency-Key`, when usable (non-empty, at most 255 bytes).
    pub idempotency_key: Option<String>,
}

/// Why a caller's headers are refused (400 `invalid_request`, this text as the message).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeaderRefusal {
    #[error("The proxy acts only on this tenant's own Stripe account; remove the {} header.", .0.join(" and "))]
    OtherAccount(Vec<&'static str>),
    #[error("Stripe-Version must be a date YYYY-MM-DD, optionally followed by .name (e.g. 2026-10-28.endive).")]
    MalformedVersion,
    #[error("Stripe-Version {given} is not accepted here (proxy.stripe_versions); send one of: {}.", .allowed.join(", "))]
    VersionNotAllowed { given: String, allowed: Vec<String> },
}

/// Reads the caller's headers under the policy above. `allowed_versions` is
/// `proxy.stripe_versions`: empty accepts any well-formed version.
pub fn caller_headers(
    headers: &HeaderMap,
    allowed_versions: &[String],
) -> Result<CallerHeaders, HeaderRefusal> {
    let other_account: Vec<&'static str> = OTHER_ACCOUNT
        .into_iter()
        .filter(|name| headers.contains_key(*name))
        .collect();
    if !other_account.is_empty() {
        return Err(HeaderRefusal::OtherAccount(other_account));
    }
    let stripe_version = match headers.get("stripe-version") {
        None => None,
        Some(raw) => {
            let version = (raw.to_str().ok())
                .filter(|v| is_stripe_version(v))
                .ok_or(HeaderRefusal::MalformedVersion)?;
            if !allowed_versions.is_empty() && !allowed_versions.iter().any(|a| a == version) {
                return Err(HeaderRefusal::VersionNotAllowed {
                    given: version.to_owned(),
                    allowed: allowed_versions.to_vec(),
                });
            }
            Some(version.to_owned())
        }
    };
    let idempotency_key = (headers.get("idempotency-key"))
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= IDEMPOTENCY_KEY_MAX)
        .map(str::to_owned);
    Ok(CallerHeaders {
        stripe_version,
        idempotency_key,
    })
}

/// `YYYY-MM-DD` (a plausible month and day), optionally `.name` in lower-case letters, as
/// Stripe names its versions (`2023-08-16`, `2026-10-28.endive`). Also checks the entries of
/// `proxy.stripe_versions`.
pub fn is_stripe_version(version: &str) -> bool {
    let (date, name) = match version.split_once('.') {
        Some((date, name)) => (date, Some(name)),
        None => (version, None),
    };
    let name_ok = name.is_none_or(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_lowercase()));
    let parts: Vec<&str> = date.split('-').collect();
    let number = |part: &str, len: usize, range: std::ops::RangeInclusive<u32>| {
        part.len() == len
            && part.bytes().all(|b| b.is_ascii_digit())
            && part.parse().is_ok_and(|n| range.contains(&n))
    };
    name_ok
        && matches!(parts.as_slice(), [y, m, d]
            if number(y, 4, 2000..=9999) && number(m, 2, 1..=12) && number(d, 2, 1..=31))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[test]
    fn the_callers_version_passes_unchanged_and_none_means_the_pinned_one() {
        let sdk = headers(&[("Stripe-Version", "2026-10-28.endive")]);
        assert_eq!(
            caller_headers(&sdk, &[]).unwrap().stripe_version.as_deref(),
            Some("2026-10-28.endive")
        );
        let plain = headers(&[("Stripe-Version", "2023-08-16")]);
        assert_eq!(
            caller_headers(&plain, &[])
                .unwrap()
                .stripe_version
                .as_deref(),
            Some("2023-08-16")
        );
        assert_eq!(
            caller_headers(&HeaderMap::new(), &[]).unwrap(),
            CallerHeaders::default()
        );
    }

    #[test]
    fn a_malformed_version_is_refused() {
        for bad in [
            "2026-10-28.",
            "2026-10-28.Endive",
            "2026-13-01",
            "2026-1-01",
            "26-10-28",
            "latest",
            "2026-10-28; feature_beta=v1",
            "2026-10-28.endive.x",
            "",
        ] {
            let given = headers(&[("Stripe-Version", bad)]);
            assert_eq!(
                caller_headers(&given, &[]),
                Err(HeaderRefusal::MalformedVersion),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_version_outside_the_setting_is_refused_naming_the_allowed_ones() {
        let allowed = vec!["2023-08-16".to_owned(), "2026-10-28.endive".to_owned()];
        let inside = headers(&[("Stripe-Version", "2026-10-28.endive")]);
        assert!(caller_headers(&inside, &allowed).is_ok());
        let outside = headers(&[("Stripe-Version", "2025-03-31.basil")]);
        let refusal = caller_headers(&outside, &allowed).unwrap_err();
        assert_eq!(
            refusal.to_string(),
            "Stripe-Version 2025-03-31.basil is not accepted here (proxy.stripe_versions); send one of: 2023-08-16, 2026-10-28.endive."
        );
        // No version sent: the pinned one, whatever the setting.
        assert_eq!(
            caller_headers(&HeaderMap::new(), &allowed)
                .unwrap()
                .stripe_version,
            None
        );
    }

    #[test]
    fn another_account_is_refused_by_name() {
        let account = headers(&[("Stripe-Account", "acct_1")]);
        assert_eq!(
            caller_headers(&account, &[]).unwrap_err().to_string(),
            "The proxy acts only on this tenant's own Stripe account; remove the Stripe-Account header."
        );
        let both = headers(&[("Stripe-Context", "ctx_1"), ("Stripe-Account", "acct_1")]);
        assert_eq!(
            caller_headers(&both, &[]).unwrap_err(),
            HeaderRefusal::OtherAccount(vec!["Stripe-Account", "Stripe-Context"])
        );
    }

    #[test]
    fn only_the_version_and_a_usable_idempotency_key_pass() {
        let sdk = headers(&[
            ("Idempotency-Key", "stripe-python-retry-1"),
            ("X-Stripe-Client-User-Agent", "{\"lang\":\"python\"}"),
            ("X-Stripe-Client-Telemetry", "{\"last_request_metrics\":{}}"),
            ("User-Agent", "Stripe/v1 PythonBindings/16.1.0"),
            ("Authorization", "Bearer ast_token"),
        ]);
        assert_eq!(
            caller_headers(&sdk, &[]).unwrap(),
            CallerHeaders {
                stripe_version: None,
                idempotency_key: Some("stripe-python-retry-1".into()),
            }
        );
        let long = "k".repeat(256);
        for unusable in ["", long.as_str()] {
            let given = headers(&[("Idempotency-Key", unusable)]);
            assert_eq!(caller_headers(&given, &[]).unwrap().idempotency_key, None);
        }
    }
}
