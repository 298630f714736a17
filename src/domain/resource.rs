use std::collections::BTreeMap;
use std::fmt;

use serde::{Serialize, Serializer};

/// A Stripe resource Atlas needs write access to. Which of them are required is
/// configuration (`stripe.required_resources`); how each is probed lives in `stripe::probe`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Resource {
    Customers,
    CheckoutSessions,
    Coupons,
    Invoices,
    WebhookEndpoints,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown Stripe resource {0:?}; known: customers, checkout_sessions, coupons, invoices, webhook_endpoints")]
pub struct UnknownResource(pub String);

impl Resource {
    pub const ALL: [Resource; 5] = [
        Self::Customers,
        Self::CheckoutSessions,
        Self::Coupons,
        Self::Invoices,
        Self::WebhookEndpoints,
    ];

    /// The name used in the API, configuration and storage.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Customers => "customers",
            Self::CheckoutSessions => "checkout_sessions",
            Self::Coupons => "coupons",
            Self::Invoices => "invoices",
            Self::WebhookEndpoints => "webhook_endpoints",
        }
    }

    pub fn parse(raw: &str) -> Result<Self, UnknownResource> {
        Self::ALL
            .into_iter()
            .find(|r| r.as_str() == raw)
            .ok_or_else(|| UnknownResource(raw.to_owned()))
    }

    /// The restricted-key permission that grants write access, as the Stripe dashboard's
    /// create-key link names it.
    pub fn dashboard_write_scope(self) -> &'static str {
        match self {
            Self::Customers => "rak_customer_write",
            Self::CheckoutSessions => "rak_checkout_session_write",
            Self::Coupons => "rak_coupon_write",
            Self::Invoices => "rak_invoice_write",
            Self::WebhookEndpoints => "rak_webhook_write",
        }
    }
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Resource {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    Granted,
    Missing,
}

impl Access {
    pub fn parse(raw: &str) -> Option<Self> {
        match raw {
            "granted" => Some(Self::Granted),
            "missing" => Some(Self::Missing),
            _ => None,
        }
    }
}

/// What a key may do, per probed resource. Serialises as `{"customers": "granted", …}`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct PermissionReport(BTreeMap<Resource, Access>);

impl PermissionReport {
    pub fn insert(&mut self, resource: Resource, access: Access) {
        self.0.insert(resource, access);
    }

    pub fn get(&self, resource: Resource) -> Option<Access> {
        self.0.get(&resource).copied()
    }

    pub fn missing(&self) -> Vec<Resource> {
        self.0
            .iter()
            .filter(|(_, access)| **access == Access::Missing)
            .map(|(resource, _)| *resource)
            .collect()
    }

    /// Whether every one of `required` was probed and granted.
    pub fn grants_all(&self, required: &[Resource]) -> bool {
        required
            .iter()
            .all(|r| self.get(*r) == Some(Access::Granted))
    }
}

impl FromIterator<(Resource, Access)> for PermissionReport {
    fn from_iter<I: IntoIterator<Item = (Resource, Access)>>(iter: I) -> Self {
        Self(iter.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for resource in Resource::ALL {
            assert_eq!(Resource::parse(resource.as_str()), Ok(resource));
        }
        assert!(Resource::parse("charges").is_err());
    }

    #[test]
    fn report_lists_missing_and_checks_required() {
        let report: PermissionReport = [
            (Resource::Customers, Access::Granted),
            (Resource::Coupons, Access::Missing),
        ]
        .into_iter()
        .collect();
        assert_eq!(report.missing(), vec![Resource::Coupons]);
        assert!(report.grants_all(&[Resource::Customers]));
        assert!(!report.grants_all(&[Resource::Customers, Resource::Coupons]));
        assert!(
            !report.grants_all(&[Resource::Invoices]),
            "unprobed is not granted"
        );
        assert_eq!(
            serde_json::to_value(&report).unwrap(),
            serde_json::json!({"customers": "granted", "coupons": "missing"})
        );
    }
}
