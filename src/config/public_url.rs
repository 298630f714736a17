//! Whether an address is what its setting needs: an http(s) URL (`stripe.api_base`), a
//! browser origin (`server.cors_allowed_origins`), or, in production, a public https
//! address Stripe can deliver webhooks to (`webhooks.public_base_url`).

use std::net::{Ipv4Addr, Ipv6Addr};

use super::load::variable_for;

/// Why `raw` is not an http(s) URL with a host, and without query, fragment or credentials.
pub(super) fn http_url_problem(raw: &str) -> Option<String> {
    let url = match url::Url::parse(raw.trim()) {
        Ok(url) => url,
        Err(e) => return Some(format!("is not a URL ({e})")),
    };
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Some("must be an http(s) URL with a host".into());
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Some("must have no query or fragment".into());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Some("must not carry credentials".into());
    }
    None
}

/// Why Stripe could not deliver webhooks under `raw`. Outside production only the shape is
/// checked (a loopback address is fine for development and tests); in production it must
/// be https on a host that is neither loopback, private, link-local nor a local name.
/// Only literal addresses and reserved names are judged: a public name may still resolve
/// to a private address.
pub(super) fn public_base_url_problem(raw: &str, production: bool) -> Option<String> {
    let hint = format!(
        "set {}=https://<the public address Stripe reaches this service at>",
        variable_for("webhooks.public_base_url")
    );
    if raw.trim().is_empty() {
        return Some(if production {
            format!("is not set: in production Stripe must be able to deliver webhooks; {hint}")
        } else {
            "is empty".into()
        });
    }
    if let Some(problem) = http_url_problem(raw) {
        return Some(problem);
    }
    if !production {
        return None;
    }
    let url = url::Url::parse(raw.trim()).ok()?;
    if url.scheme() != "https" {
        return Some(format!(
            "must be an https URL in production, not {}; {hint}",
            url.scheme()
        ));
    }
    let host = url.host()?;
    let why = match &host {
        url::Host::Domain(name) => local_name(name),
        url::Host::Ipv4(ip) => non_public_v4(*ip),
        url::Host::Ipv6(ip) => non_public_v6(*ip),
    }?;
    Some(format!(
        "points at {host}, {why}, which Stripe cannot reach; {hint}"
    ))
}

/// Names that never resolve to a public address.
fn local_name(name: &str) -> Option<&'static str> {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    if name == "localhost" || name.ends_with(".localhost") {
        Some("a localhost name")
    } else if !name.contains('.') {
        Some("a single-label name (not a public DNS name)")
    } else if name.ends_with(".local")
        || name.ends_with(".internal")
        || name.ends_with(".home.arpa")
    {
        Some("a local-network name")
    } else {
        None
    }
}

fn non_public_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, ..] = ip.octets();
    Some(if ip.is_unspecified() || a == 0 {
        "an unspecified address"
    } else if ip.is_loopback() {
        "a loopback address"
    } else if ip.is_private() {
        "a private (RFC 1918) address"
    } else if ip.is_link_local() {
        "a link-local address"
    } else if a == 100 && (b & 0xc0) == 64 {
        "a carrier-grade NAT (100.64.0.0/10) address"
    } else if ip.is_broadcast() || ip.is_multicast() || a >= 240 {
        "a broadcast, multicast or reserved address"
    } else if ip.is_documentation() {
        "a documentation address"
    } else {
        return None;
    })
}

fn non_public_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let s = ip.segments();
    // IPv4-mapped (::ffff:a.b.c.d), NAT64 (64:ff9b::a.b.c.d) and the deprecated
    // IPv4-compatible (::a.b.c.d) forms carry an IPv4 address.
    let [.., hi, lo] = s;
    let embedded = Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo));
    if ip.to_ipv4_mapped().is_some()
        || s[..6] == [0x64, 0xff9b, 0, 0, 0, 0]
        || (s[..6] == [0; 6] && !ip.is_loopback() && !ip.is_unspecified())
    {
        return non_public_v4(embedded);
    }
    Some(if ip.is_unspecified() {
        "an unspecified address"
    } else if ip.is_loopback() {
        "a loopback address"
    } else if ip.is_unique_local() {
        "a unique-local (fc00::/7) address"
    } else if ip.is_unicast_link_local() || (s[0] & 0xffc0) == 0xfec0 {
        "a link-local or site-local address"
    } else if ip.is_multicast() {
        "a multicast address"
    } else if s[0] == 0x2001 && s[1] == 0x0db8 {
        "a documentation address"
    } else {
        return None;
    })
}

/// Why `raw` is not a browser origin as a browser sends it: `scheme://host[:port]`, lower
/// case, without path (not even '/'), query, fragment or the scheme's default port.
pub(super) fn origin_problem(raw: &str) -> Option<String> {
    let not_origin = || {
        Some(format!(
            "lists {raw:?}, which is not an origin scheme://host[:port] (http or https, no \
             path, not even a trailing '/')"
        ))
    };
    let Ok(url) = url::Url::parse(raw) else {
        return not_origin();
    };
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return not_origin();
    }
    let origin = url.origin().ascii_serialization();
    if origin != raw {
        return Some(format!(
            "lists {raw:?}, which is not an origin scheme://host[:port]; did you mean {origin:?}?"
        ));
    }
    None
}
