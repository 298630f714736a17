//! Which Stripe endpoints the proxy forwards: `METHOD /v1/template` pairs, matched against
//! the concrete path a caller sends (`/v1/invoices/in_123/pay` matches
//! `/v1/invoices/{invoice}/pay`).

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
    Id,
}

/// Literal segments Stripe has beside an id at the same place (`/v1/customers/search`,
/// `/v1/invoices/upcoming`): never taken for an id, so they cannot reach an endpoint that
/// is not allowlisted through a template that is.
const STRIPE_LITERALS_BESIDE_IDS: [&str; 2] = ["search", "upcoming"];

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
                Some(name) if name.ends_with('}') && name.len() > 1 => Ok(Segment::Id),
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
                Segment::Id => !STRIPE_LITERALS_BESIDE_IDS.contains(given),
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
        ])
        .unwrap()
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
