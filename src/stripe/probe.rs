//! Proves, without side effects, which resources a key may write.
//!
//! Each probe updates an object that cannot exist (a random id). Stripe checks a restricted
//! key's permission for the endpoint before it looks the object up, so 403 means the
//! permission is missing and 404/400 `invalid_request_error` means it is granted. Never an
//! empty *create*: `POST /v1/customers` with no body creates a real customer.

use std::time::Duration;

use futures_util::future::join_all;

use super::client::{StripeClient, StripeFailure, StripeMethod, StripeReply, StripeRequest};
use crate::domain::{random_id, Access, PermissionReport, Resource, StripeKey};

/// Why a probe run did not produce a report.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProbeError {
    /// Stripe answered 401: the key is invalid, expired or revoked.
    #[error("Stripe rejected the key (expired: {expired})")]
    KeyRejected { expired: bool },
    /// Some probe got no conclusive answer; nothing may be concluded from the others.
    #[error("probing {resource} was inconclusive: {reason}")]
    Inconclusive { resource: Resource, reason: String },
}

/// The side-effect-free request that proves write access to `resource`.
pub fn probe_request(resource: Resource) -> StripeRequest {
    let endpoint = match resource {
        Resource::Customers => "/v1/customers/{customer}",
        Resource::CheckoutSessions => "/v1/checkout/sessions/{session}/expire",
        Resource::Coupons => "/v1/coupons/{coupon}",
        Resource::Invoices => "/v1/invoices/{invoice}",
        Resource::WebhookEndpoints => "/v1/webhook_endpoints/{webhook_endpoint}",
    };
    let path = match resource {
        Resource::Customers => format!("/v1/customers/{}", random_id("cus_atlasprobe", 16)),
        Resource::CheckoutSessions => {
            format!(
                "/v1/checkout/sessions/{}/expire",
                random_id("cs_atlasprobe", 16)
            )
        }
        Resource::Coupons => format!("/v1/coupons/{}", random_id("atlasprobe", 16)),
        Resource::Invoices => format!("/v1/invoices/{}", random_id("in_atlasprobe", 16)),
        Resource::WebhookEndpoints => {
            format!("/v1/webhook_endpoints/{}", random_id("we_atlasprobe", 16))
        }
    };
    StripeRequest {
        method: StripeMethod::Post,
        endpoint,
        path,
        form: Vec::new(),
        idempotency_key: None,
    }
}

enum Verdict {
    Access(Access),
    Rejected { expired: bool },
    Inconclusive(String),
}

fn judge(reply: &StripeReply) -> Verdict {
    match reply.status {
        403 => Verdict::Access(Access::Missing),
        404 | 400 if reply.error_type() == Some("invalid_request_error") => {
            Verdict::Access(Access::Granted)
        }
        401 => Verdict::Rejected {
            expired: reply.error_code() == Some("api_key_expired"),
        },
        status => Verdict::Inconclusive(format!("unexpected answer {status}")),
    }
}

/// Probes every resource in `required` concurrently, within `deadline` in all.
pub async fn probe_write_access(
    client: &StripeClient,
    key: &StripeKey,
    required: &[Resource],
    deadline: Duration,
) -> Result<PermissionReport, ProbeError> {
    let probes = required.iter().map(|&resource| async move {
        let verdict = match client.send(key, &probe_request(resource)).await {
            Ok(reply) => judge(&reply),
            Err(failure) => Verdict::Inconclusive(failure.to_string()),
        };
        let result = match &verdict {
            Verdict::Access(Access::Granted) => "granted",
            Verdict::Access(Access::Missing) => "missing",
            Verdict::Rejected { .. } => "key_rejected",
            Verdict::Inconclusive(_) => "inconclusive",
        };
        metrics::counter!("atlas_probe_results_total", "resource" => resource.as_str(), "result" => result).increment(1);
        (resource, verdict)
    });
    let Ok(verdicts) = tokio::time::timeout(deadline, join_all(probes)).await else {
        return Err(ProbeError::Inconclusive {
            resource: required.first().copied().unwrap_or(Resource::Customers),
            reason: StripeFailure::Timeout.to_string(),
        });
    };
    let mut report = PermissionReport::default();
    let mut inconclusive = None;
    for (resource, verdict) in verdicts {
        match verdict {
            Verdict::Access(access) => report.insert(resource, access),
            // A 401 on any probe settles it: the key itself is bad.
            Verdict::Rejected { expired } => return Err(ProbeError::KeyRejected { expired }),
            Verdict::Inconclusive(reason) => {
                inconclusive.get_or_insert(ProbeError::Inconclusive { resource, reason });
            }
        }
    }
    match inconclusive {
        Some(error) => Err(error),
        None => Ok(report),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn probes_update_random_ids_and_never_create() {
        for resource in Resource::ALL {
            let a = probe_request(resource);
            let b = probe_request(resource);
            assert_eq!(a.method, StripeMethod::Post);
            assert!(a.form.is_empty());
            assert_ne!(a.path, b.path, "ids must be random");
            // A create is a POST to the collection: /v1/customers, /v1/coupons, …
            let segments: Vec<&str> = a.path.trim_start_matches("/v1/").split('/').collect();
            assert!(segments.len() >= 2, "{} looks like a create", a.path);
        }
    }

    #[test]
    fn judges_by_status_and_error_type() {
        let reply = |status, body| StripeReply { status, body };
        let missing =
            json!({"error": {"type": "invalid_request_error", "code": "resource_missing"}});
        assert!(matches!(
            judge(&reply(404, missing.clone())),
            Verdict::Access(Access::Granted)
        ));
        assert!(matches!(
            judge(&reply(400, missing.clone())),
            Verdict::Access(Access::Granted)
        ));
        assert!(matches!(
            judge(&reply(403, missing.clone())),
            Verdict::Access(Access::Missing)
        ));
        let api = json!({"error": {"type": "api_error"}});
        assert!(matches!(judge(&reply(400, api)), Verdict::Inconclusive(_)));
        assert!(matches!(
            judge(&reply(200, json!({"id": "cus_1"}))),
            Verdict::Inconclusive(_)
        ));
        let expired =
            json!({"error": {"type": "invalid_request_error", "code": "api_key_expired"}});
        assert!(matches!(
            judge(&reply(401, expired)),
            Verdict::Rejected { expired: true }
        ));
        assert!(matches!(
            judge(&reply(401, missing)),
            Verdict::Rejected { expired: false }
        ));
    }
}
