//! `expand[]`: Stripe replaces an id in its answer with the whole object it names, so an
//! expansion can hand a caller objects no allowlisted endpoint returns (a customer's
//! `sources`). Only the values of `proxy.expand_allowed` are forwarded.

/// Whether every `expand` parameter of the query string and the form body names an
/// allowed expansion. Keys and values are judged decoded (`expand%5B%5D=sources` is
/// `expand[]=sources`), as Stripe reads them.
pub fn expansions_allowed(allowed: &[String], query: Option<&str>, body: &[u8]) -> bool {
    let query = url::form_urlencoded::parse(query.unwrap_or_default().as_bytes());
    let body = url::form_urlencoded::parse(body);
    query.chain(body).all(|(key, value)| {
        let expand = key == "expand" || key.starts_with("expand[");
        !expand || allowed.iter().any(|a| *a == value)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed() -> Vec<String> {
        vec!["customer".into(), "data.invoice".into()]
    }

    #[test]
    fn only_listed_expansions_pass() {
        let ok =
            |query: &str, body: &str| expansions_allowed(&allowed(), Some(query), body.as_bytes());
        assert!(ok("", ""));
        assert!(ok("limit=3", "email=a%40b.c"));
        assert!(ok("expand[]=customer", ""));
        assert!(ok("", "expand[0]=customer&expand[1]=data.invoice"));
        assert!(!ok("expand[]=sources", ""));
        assert!(!ok("expand%5B%5D=sources", ""));
        assert!(!ok("", "expand[]=customer&expand[]=customer.sources"));
        assert!(!ok("expand=default_source", ""));
        assert!(!ok("expand[]=", ""));
        // Not an expansion: another parameter whose name begins alike.
        assert!(ok("expanded=1", ""));
    }
}
