//! Which Stripe endpoints the proxy forwards: `METHOD /v1/template` pairs, matched against
//! the concrete path a caller sends (`/v1/invoices/in_123/pay` matches
//! `/v1/invoices/{invoice}/pay`). A `{param}` matches only what can be an id of its
//! resource, so no literal of Stripe's API (`/v1/invoices/create_preview`) is ever taken for
//! one and forwarded under a template that was allowlisted for ids.

use axum::http::Method;

/// One allowlisted endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    method: Method,
    template: String,
    segments: Vec<Segment>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Id(IdRule),
}

/// What a `{param}` accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum IdRule {
    /// Stripe's ids carry a fixed prefix per object: `cus_…`, `cs_…`, `in_…`, `ii_…`. No
    /// literal of Stripe's API has one.
    Prefixed(&'static str),
    /// Coupons take any id the account chose: anything but a literal Stripe has at that
    /// depth of a path ([`STRIPE_LITERALS`]).
    Chosen,
}

/// The parameters the proxy knows, by the name Stripe's templates give them.
const PARAMS: [(&str, IdRule); 5] = [
    ("customer", IdRule::Prefixed("cus_")),
    ("session", IdRule::Prefixed("cs_")),
    ("invoice", IdRule::Prefixed("in_")),
    ("invoiceitem", IdRule::Prefixed("ii_")),
    ("coupon", IdRule::Chosen),
];

/// Every literal Stripe has as the second segment below `/v1/` (`/v1/invoices/upcoming`,
/// `/v1/checkout/sessions`), from its OpenAPI description of the pinned version (the test
/// `chosen_ids_refuse_every_literal_of_the_contract` checks this list against
/// tests/fixtures/stripe-contract.json), plus literals Stripe serves that are newer than
/// that description (`create_preview`, `upcoming_lines`, `meter_events`).
const STRIPE_LITERALS: &[&str] = &[
    "accounts",
    "authorizations",
    "calculations",
    "cardholders",
    "cards",
    "configurations",
    "connection_tokens",
    "create_preview",
    "credit_reversals",
    "customers",
    "debit_reversals",
    "disputes",
    "domains",
    "early_fraud_warnings",
    "financial_accounts",
    "history",
    "inbound_transfers",
    "issuing",
    "locations",
    "meter_events",
    "outbound_payments",
    "outbound_transfers",
    "preview",
    "readers",
    "received_credits",
    "received_debits",
    "refunds",
    "report_runs",
    "report_types",
    "scheduled_query_runs",
    "search",
    "secrets",
    "sessions",
    "settings",
    "settlements",
    "terminal",
    "test_clocks",
    "transaction_entries",
    "transactions",
    "treasury",
    "upcoming",
    "upcoming_lines",
    "value_list_items",
    "value_lists",
    "verification_reports",
    "verification_sessions",
];

impl IdRule {
    fn of(param: &str) -> Option<Self> {
        PARAMS
            .iter()
            .find(|(name, _)| *name == param)
            .map(|(_, rule)| *rule)
    }

    fn accepts(self, segment: &str) -> bool {
        match self {
            Self::Prefixed(prefix) => segment
                .strip_prefix(prefix)
                .is_some_and(|rest| !rest.is_empty()),
            Self::Chosen => !STRIPE_LITERALS.contains(&segment),
        }
    }
}

impl Endpoint {
    /// Parses `METHOD /v1/path/{param}`; the error says what is wrong (for the settings).
    pub fn parse(entry: &str) -> Result<Self, String> {
        let (method, template) = entry
            .trim()
            .split_once(' ')
            .ok_or_else(|| format!("entry {entry:?} is not `METHOD /v1/template`"))?;
        let method = match method {
            "GET" => Method::GET,
            "POST" => Method::POST,
            "DELETE" => Method::DELETE,
            _ => {
                return Err(format!(
                    "entry {entry:?}: the method is GET, POST or DELETE"
                ))
            }
        };
        let template = template.trim();
        let rest = template
            .strip_prefix("/v1/")
            .ok_or_else(|| format!("entry {entry:?}: the path starts with /v1/"))?;
        let segments = rest
            .split('/')
            .map(|segment| match segment.strip_prefix('{') {
                Some(name) if name.ends_with('}') && name.len() > 1 => {
                    let param = &name[..name.len() - 1];
                    IdRule::of(param).map(Segment::Id).ok_or_else(|| {
                        let known: Vec<&str> = PARAMS.iter().map(|(name, _)| *name).collect();
                        format!(
                            "entry {entry:?}: {{{param}}} is not a parameter the proxy knows \
                             the ids of ({})",
                            known.join(", ")
                        )
                    })
                }
                _ if is_plain(segment) => Ok(Segment::Literal(segment.to_owned())),
                _ => Err(format!(
                    "entry {entry:?}: {segment:?} is not a path segment"
                )),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            method,
            template: template.to_owned(),
            segments,
        })
    }

    /// The template, e.g. `/v1/invoices/{invoice}/pay` (for metrics and logs).
    pub fn template(&self) -> &str {
        &self.template
    }

    fn matches(&self, method: &Method, path_below_v1: &[&str]) -> bool {
        *method == self.method
            && self.segments.len() == path_below_v1.len()
            && (self.segments.iter().zip(path_below_v1)).all(|(s, given)| match s {
                Segment::Literal(literal) => literal == given,
                Segment::Id(rule) => rule.accepts(given),
            })
    }
}

/// Letters, digits, `_` and `-`: what Stripe's path segments and object ids are made of.
/// Anything else (`..`, `%2F`, an empty segment) never reaches Stripe.
fn is_plain(segment: &str) -> bool {
    !segment.is_empty()
        && segment.len() <= 255
        && segment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

#[derive(Clone, Debug)]
pub struct Allowlist(Vec<Endpoint>);

impl Allowlist {
    pub fn parse(entries: &[String]) -> Result<Self, String> {
        entries
            .iter()
            .map(|e| Endpoint::parse(e))
            .collect::<Result<_, _>>()
            .map(Self)
    }

    /// The allowlisted endpoint `method` and the path below `/v1/` reach, if any.
    pub fn find(&self, method: &Method, path_below_v1: &str) -> Option<&Endpoint> {
        let segments: Vec<&str> = path_below_v1.split('/').collect();
        if !segments.iter().all(|s| is_plain(s)) {
            return None;
        }
        self.0.iter().find(|e| e.matches(method, &segments))
    }

    pub fn endpoints(&self) -> &[Endpoint] {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowlist() -> Allowlist {
        Allowlist::parse(&[
            "POST /v1/invoices/{invoice}/pay".into(),
            "GET /v1/customers/{customer}".into(),
            "POST /v1/customers".into(),
            "GET /v1/invoices/{invoice}".into(),
            "GET /v1/coupons/{coupon}".into(),
            "GET /v1/invoiceitems/{invoiceitem}".into(),
            "GET /v1/checkout/sessions/{session}".into(),
        ])
        .unwrap()
    }

    /// Issue 21: `POST /v1/invoices/create_preview` was forwarded as an invoice update.
    #[test]
    fn a_param_matches_only_an_id_of_its_resource() {
        let list = allowlist();
        for (method, path) in [
            (Method::GET, "invoices/in_1MtHbELkdIwHu7ix"),
            (Method::GET, "customers/cus_NffrFeUfNV2Hib"),
            (Method::GET, "invoiceitems/ii_1MtGUtLkdIwHu7ix"),
            (Method::GET, "checkout/sessions/cs_test_a1b2"),
            (Method::GET, "coupons/SUMMER25"),
            (Method::GET, "coupons/Z4OV52SU"),
        ] {
            assert!(list.find(&method, path).is_some(), "{method} {path}");
        }
        for (method, path) in [
            (Method::GET, "invoices/create_preview"),
            (Method::GET, "invoices/upcoming"),
            (Method::GET, "invoices/search"),
            (Method::GET, "invoices/ii_1MtGUtLkdIwHu7ix"),
            (Method::GET, "invoices/in_"),
            (Method::GET, "customers/search"),
            (Method::GET, "customers/cs_test_a1b2"),
            (Method::GET, "invoiceitems/in_1"),
            (Method::GET, "checkout/sessions/cus_1"),
            (Method::GET, "coupons/search"),
            (Method::GET, "coupons/create_preview"),
        ] {
            assert!(list.find(&method, path).is_none(), "{method} {path}");
        }
    }

    #[test]
    fn chosen_ids_refuse_every_literal_of_the_contract() {
        let contract: serde_json::Value =
            serde_json::from_str(include_str!("../../tests/fixtures/stripe-contract.json"))
                .unwrap();
        let paths = contract["paths"].as_object().unwrap();
        let mut literals = 0;
        for path in paths.keys() {
            let segments: Vec<&str> = path.trim_start_matches("/v1/").split('/').collect();
            if let Some(second) = segments.get(1).filter(|s| !s.starts_with('{')) {
                literals += 1;
                assert!(!IdRule::Chosen.accepts(second), "{path}: {second}");
            }
        }
        assert!(literals > 40, "the contract's paths were read: {literals}");
    }

    #[test]
    fn params_without_a_known_id_are_refused() {
        let err = Endpoint::parse("GET /v1/prices/{price}").unwrap_err();
        assert!(err.contains("{price}"), "{err}");
    }

    #[test]
    fn templates_match_concrete_paths_only() {
        let list = allowlist();
        let pay = list.find(&Method::POST, "invoices/in_123/pay").unwrap();
        assert_eq!(pay.template(), "/v1/invoices/{invoice}/pay");
        assert!(list.find(&Method::GET, "invoices/in_123/pay").is_none());
        assert!(list.find(&Method::POST, "invoices/in_123/void").is_none());
        assert!(list.find(&Method::POST, "invoices/in_123").is_none());
        assert!(list.find(&Method::POST, "customers").is_some());
        assert!(list.find(&Method::GET, "customers/cus_1").is_some());
        assert!(list.find(&Method::GET, "customers/search").is_none());
        // Each has the segment count of `GET /v1/customers/{customer}`, so only the rule on
        // the segment itself can refuse it.
        for sneaky in [
            "customers/..",
            "customers/.",
            "customers/cus_1/",
            "customers//x",
            "customers/cus%2F1",
            "customers/cus 1",
            "",
        ] {
            assert!(list.find(&Method::GET, sneaky).is_none(), "{sneaky:?}");
        }
    }

    #[test]
    fn malformed_entries_are_refused() {
        for bad in [
            "PATCH /v1/customers",
            "GET /customers",
            "GET",
            "GET /v1/customers/{}",
            "GET /v1/cus..tomers",
        ] {
            assert!(Endpoint::parse(bad).is_err(), "{bad}");
        }
    }
}
