//! Proves, without side effects, which resources a key may write.
//!
//! Each probe updates an object that cannot exist (a random id). Stripe checks a restricted
//! key's permission for the endpoint before it looks the object up, so 403 means the
//! permission is missing and 404 `resource_missing` (the random object was looked up and
//! not found) means it is granted. A 404 without that code is not proof: Stripe answers a
//! URL it does not know ("Unrecognized request URL") with 404 `invalid_request_error` and
//! no code, so a probe path that drifted would otherwise prove every permission. No 400
//! proves access (a probe sends no parameters to get wrong); every other answer is
//! inconclusive. Never an empty *create*: `POST /v1/customers` with no body creates a real
//! customer.

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
        // The object was looked up, so the permission check before it passed.
        404 if reply.error_type() == Some("invalid_request_error")
            && reply.error_code() == Some("resource_missing") =>
        {
            Verdict::Access(Access::Granted)
        }
        401 => Verdict::Rejected {
            expired: reply.error_code() == Some("api_key_expired"),
        },
        status => Verdict::Inconclusive(format!(
            "unexpected answer {status} ({})",
            reply.error_code().unwrap_or("no error code")
        )),
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

    fn reply(status: u16, body: serde_json::Value) -> StripeReply {
        StripeReply { status, body }
    }

    fn granted(v: Verdict) -> bool {
        matches!(v, Verdict::Access(Access::Granted))
    }

    fn inconclusive(v: Verdict) -> bool {
        matches!(v, Verdict::Inconclusive(_))
    }

    /// Stripe's answer to an update of an object that does not exist.
    fn resource_missing(object: &str, id: &str) -> serde_json::Value {
        json!({"error": {
            "code": "resource_missing",
            "doc_url": "https://stripe.com/docs/error-codes/resource-missing",
            "message": format!("No such {object}: '{id}'"),
            "param": "id",
            "type": "invalid_request_error",
        }})
    }

    #[test]
    fn a_404_resource_missing_is_granted() {
        for (object, id) in [
            ("customer", "cus_atlasprobeAbc"),
            ("checkout.session", "cs_atlasprobeAbc"),
            ("coupon", "atlasprobeAbc"),
            ("invoice", "in_atlasprobeAbc"),
            ("webhook endpoint", "we_atlasprobeAbc"),
        ] {
            assert!(granted(judge(&reply(404, resource_missing(object, id)))));
        }
    }

    #[test]
    fn an_unrecognized_url_is_inconclusive_never_granted() {
        // Exactly what Stripe answers for a path it does not know: no `code`.
        let unrecognized = json!({"error": {
            "type": "invalid_request_error",
            "message": "Unrecognized request URL (POST: /v1/customerz/cus_atlasprobeAbc). \
                        Please see https://stripe.com/docs or we can help at https://support.stripe.com/.",
        }});
        assert!(inconclusive(judge(&reply(404, unrecognized.clone()))));
        // A 404 with some other code, or of another type, is no proof either.
        let other_code = json!({"error": {"type": "invalid_request_error", "code": "url_invalid"}});
        assert!(inconclusive(judge(&reply(404, other_code))));
        let api_error = json!({"error": {"type": "api_error", "code": "resource_missing"}});
        assert!(inconclusive(judge(&reply(404, api_error))));
    }

    #[test]
    fn no_400_proves_access() {
        let missing = resource_missing("customer", "cus_1");
        assert!(inconclusive(judge(&reply(400, missing))));
        for code in ["parameter_unknown", "parameter_missing", "resource_missing"] {
            let body = json!({"error": {"type": "invalid_request_error", "code": code}});
            assert!(inconclusive(judge(&reply(400, body))), "{code}");
        }
        let no_code = json!({"error": {"type": "invalid_request_error", "message": "bad"}});
        assert!(inconclusive(judge(&reply(400, no_code))));
    }

    #[test]
    fn a_403_is_missing_whatever_its_body() {
        let denied = json!({"error": {
            "message": "The provided key 'rk_test_***Abcd' does not have the required permissions for this endpoint on account 'acct_1'.",
            "type": "invalid_request_error",
        }});
        assert!(matches!(
            judge(&reply(403, denied)),
            Verdict::Access(Access::Missing)
        ));
    }

    #[test]
    fn a_401_rejects_the_key_and_says_whether_it_expired() {
        let expired =
            json!({"error": {"type": "invalid_request_error", "code": "api_key_expired"}});
        assert!(matches!(
            judge(&reply(401, expired)),
            Verdict::Rejected { expired: true }
        ));
        let invalid = json!({"error": {"type": "invalid_request_error", "message": "Invalid API Key provided: rk_test_****Abcd"}});
        assert!(matches!(
            judge(&reply(401, invalid)),
            Verdict::Rejected { expired: false }
        ));
    }

    #[test]
    fn anything_else_is_inconclusive() {
        // A success would mean the random object existed (or the probe created something).
        assert!(inconclusive(judge(&reply(200, json!({"id": "cus_1"})))));
        for status in [402, 405, 409, 410, 429, 500, 503] {
            let body =
                json!({"error": {"type": "invalid_request_error", "code": "resource_missing"}});
            assert!(inconclusive(judge(&reply(status, body))), "{status}");
        }
    }
}
