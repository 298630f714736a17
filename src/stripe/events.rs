//! Stripe's event log (`GET /v1/events`): the side-effect-free Events: Read probe, and the
//! pages a recovery lists. Stripe keeps events listable for 30 days and lists newest first:
//! `starting_after` pages towards older events, `has_more` says whether there are any.

use serde_json::Value;

use super::client::{StripeMethod, StripeReply, StripeRequest};

/// The most Stripe returns in one page.
pub const PAGE_LIMIT: u32 = 100;

/// `types[]` takes at most this many names; more (or a wildcard) lists every type and
/// filters here.
const MAX_TYPES: usize = 20;

/// How long Stripe keeps events listable.
pub const RETENTION: time::Duration = time::Duration::days(30);

/// `GET /v1/events?limit=1`: reads one event (or none), so it changes nothing; 403 when the
/// restricted key lacks Events: Read.
pub fn probe_request() -> StripeRequest {
    StripeRequest {
        method: StripeMethod::Get,
        endpoint: "/v1/events",
        path: "/v1/events".to_owned(),
        form: vec![("limit".to_owned(), "1".to_owned())],
        idempotency_key: None,
    }
}

/// One page of the events of `types` created at or after `created_gte` (unix seconds),
/// older than the event `starting_after` when given.
pub fn list_request(
    types: &[String],
    created_gte: i64,
    starting_after: Option<&str>,
    limit: u32,
) -> StripeRequest {
    let mut form = vec![
        ("created[gte]".to_owned(), created_gte.to_string()),
        ("limit".to_owned(), limit.clamp(1, PAGE_LIMIT).to_string()),
    ];
    if let Some(after) = starting_after {
        form.push(("starting_after".to_owned(), after.to_owned()));
    }
    if filters_by_type(types) {
        for event_type in types {
            form.push(("types[]".to_owned(), event_type.clone()));
        }
    }
    StripeRequest {
        method: StripeMethod::Get,
        endpoint: "/v1/events",
        path: "/v1/events".to_owned(),
        form,
        idempotency_key: None,
    }
}

/// Whether Stripe can filter by `types` itself (else every type is listed and
/// [`EventPage::events`] keeps the subscribed ones).
fn filters_by_type(types: &[String]) -> bool {
    types.len() <= MAX_TYPES && !types.iter().any(|t| t.contains('*'))
}

/// Whether an event of `event_type` is one our endpoint subscribes to.
pub fn subscribed(types: &[String], event_type: &str) -> bool {
    types.iter().any(|t| {
        t == "*"
            || t == event_type
            || t.strip_suffix('*')
                .is_some_and(|prefix| event_type.starts_with(prefix))
    })
}

/// An event as Stripe lists it.
#[derive(Clone, Debug)]
pub struct ListedEvent {
    pub id: String,
    pub event_type: String,
    pub created: i64,
    pub livemode: bool,
    /// The event object as listed, stored as the payload.
    pub payload: String,
}

/// A page of the event log, newest first.
#[derive(Clone, Debug)]
pub struct EventPage {
    pub events: Vec<ListedEvent>,
    pub has_more: bool,
    /// The id of the page's last (oldest) event, where the next page starts, whether or
    /// not it is one of ours.
    pub oldest_id: Option<String>,
}

/// A Stripe event id: the prefix and letters, digits or underscores (never trusted blindly
/// into the next request).
pub fn valid_event_id(id: &str) -> bool {
    id.strip_prefix("evt_").is_some_and(|rest| {
        !rest.is_empty()
            && rest.len() <= 255
            && rest.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    })
}

fn valid_type(event_type: &str) -> bool {
    !event_type.is_empty()
        && event_type.len() <= 255
        && (event_type.bytes()).all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

/// Reads a page; `None` when the answer is not a list of events. Events outside `types`
/// are left out (they are listed when Stripe cannot filter).
pub fn parse_page(reply: &StripeReply, types: &[String]) -> Option<EventPage> {
    let data = reply.body.get("data")?.as_array()?;
    let has_more = reply.body.get("has_more")?.as_bool()?;
    let mut events = Vec::with_capacity(data.len());
    let mut oldest_id = None;
    for item in data {
        let id = item.get("id").and_then(Value::as_str)?;
        if !valid_event_id(id) {
            return None;
        }
        oldest_id = Some(id.to_owned());
        let event_type = item.get("type").and_then(Value::as_str)?;
        if !valid_type(event_type) {
            return None;
        }
        if !subscribed(types, event_type) {
            continue;
        }
        events.push(ListedEvent {
            id: id.to_owned(),
            event_type: event_type.to_owned(),
            created: item.get("created").and_then(Value::as_i64)?,
            livemode: item.get("livemode").and_then(Value::as_bool)?,
            payload: item.to_string(),
        });
    }
    Some(EventPage {
        events,
        has_more,
        oldest_id,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn types(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn lists_with_stripe_parameters() {
        let request = list_request(&types(&["invoice.paid"]), 1_700_000_000, Some("evt_9"), 500);
        let form: Vec<(&str, &str)> = (request.form.iter())
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            form,
            [
                ("created[gte]", "1700000000"),
                ("limit", "100"),
                ("starting_after", "evt_9"),
                ("types[]", "invoice.paid"),
            ]
        );
        let wildcard = list_request(&types(&["invoice.*"]), 0, None, 10);
        assert!(wildcard.form.iter().all(|(k, _)| k != "types[]"));
    }

    #[test]
    fn keeps_subscribed_events_and_the_oldest_id() {
        let reply = StripeReply {
            status: 200,
            body: json!({"object": "list", "has_more": true, "data": [
                {"id": "evt_2", "type": "invoice.paid", "created": 2, "livemode": false},
                {"id": "evt_1", "type": "customer.created", "created": 1, "livemode": false},
            ]}),
        };
        let page = parse_page(&reply, &types(&["invoice.*"])).expect("a page");
        assert!(page.has_more);
        assert_eq!(page.oldest_id.as_deref(), Some("evt_1"));
        assert_eq!(page.events.len(), 1);
        assert_eq!(page.events[0].id, "evt_2");
        let bad = StripeReply {
            status: 200,
            body: json!({"has_more": false, "data": [{"id": "evt_../x", "type": "a"}]}),
        };
        assert!(parse_page(&bad, &types(&["*"])).is_none());
    }

    #[test]
    fn subscription_matches_names_and_wildcards() {
        let subscribed_to = types(&["invoice.paid", "checkout.session.*"]);
        assert!(subscribed(&subscribed_to, "invoice.paid"));
        assert!(subscribed(&subscribed_to, "checkout.session.completed"));
        assert!(!subscribed(&subscribed_to, "invoice.created"));
        assert!(subscribed(&types(&["*"]), "anything.at_all"));
    }
}
