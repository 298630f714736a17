//! The reference integrations modal: `GET /connect/stripe` and its assets, embedded in the
//! binary (no front-end build step). The page is plain HTML; the modal is the custom element
//! `<atlas-stripe-connect>` in `static/connect/`, which Atlas's front end can load on its own.
//!
//! Every answer carries a strict Content-Security-Policy: scripts, styles and requests only
//! from this origin, no inline script or style, no string-to-DOM sinks (Trusted Types), no
//! framing, no form submission. The page is not part of the API and not in `/openapi.json`.

use std::sync::LazyLock;

use axum::extract::rejection::PathRejection;
use axum::extract::Path;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use sha2::{Digest, Sha256};

use super::error::ApiError;
use super::state::AppState;

pub const PAGE_PATH: &str = "/connect/stripe";
pub const ASSETS_PATH: &str = "/connect/stripe/assets";

pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; \
    style-src 'self'; img-src 'self'; connect-src 'self'; object-src 'none'; \
    base-uri 'none'; form-action 'none'; frame-ancestors 'none'; \
    require-trusted-types-for 'script'; trusted-types 'none'";

const JS: &str = "text/javascript; charset=utf-8";

struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

const PAGE: &[u8] = include_bytes!("../../static/connect/index.html");

const ASSETS: &[Asset] = &[
    Asset {
        name: "atlas-stripe-connect.js",
        content_type: JS,
        body: include_bytes!("../../static/connect/atlas-stripe-connect.js"),
    },
    Asset {
        name: "key-check.js",
        content_type: JS,
        body: include_bytes!("../../static/connect/key-check.js"),
    },
    Asset {
        name: "api.js",
        content_type: JS,
        body: include_bytes!("../../static/connect/api.js"),
    },
    Asset {
        name: "demo.js",
        content_type: JS,
        body: include_bytes!("../../static/connect/demo.js"),
    },
    Asset {
        name: "connect.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("../../static/connect/connect.css"),
    },
    Asset {
        name: "page.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("../../static/connect/page.css"),
    },
    Asset {
        name: "icon.svg",
        content_type: "image/svg+xml",
        body: include_bytes!("../../static/connect/icon.svg"),
    },
];

/// One strong validator per asset, so a browser revalidates cheaply and never mixes an old
/// script with a new binary.
static ETAGS: LazyLock<Vec<HeaderValue>> = LazyLock::new(|| {
    ASSETS
        .iter()
        .map(|asset| {
            let digest = Sha256::digest(asset.body);
            HeaderValue::try_from(format!("\"{}\"", hex::encode(&digest[..16])))
                .expect("hex is a valid header value")
        })
        .collect()
});

pub fn router() -> Router<AppState> {
    Router::new()
        .route(PAGE_PATH, get(page))
        .route(&format!("{ASSETS_PATH}/{{file}}"), get(asset))
}

fn security_headers(headers: &mut HeaderMap) {
    let fixed = [
        (
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CONTENT_SECURITY_POLICY),
        ),
        (
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ),
        (
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ),
        (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
    ];
    for (name, value) in fixed {
        headers.insert(name, value);
    }
}

async fn page() -> Response {
    let mut response = (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        )],
        PAGE,
    )
        .into_response();
    let headers = response.headers_mut();
    security_headers(headers);
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        "cross-origin-opener-policy",
        HeaderValue::from_static("same-origin"),
    );
    response
}

async fn asset(file: Result<Path<String>, PathRejection>, request_headers: HeaderMap) -> Response {
    // A name that is not UTF-8 once decoded is no asset either (axum's own rejection would
    // be plain text, outside our error shape).
    let Ok(Path(file)) = file else {
        return ApiError::RouteNotFound.into_response();
    };
    let Some(index) = ASSETS.iter().position(|a| a.name == file) else {
        return ApiError::RouteNotFound.into_response();
    };
    let asset = &ASSETS[index];
    let etag = &ETAGS[index];
    let fresh = request_headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|tags| tags.split(',').any(|t| t.trim() == etag));
    let mut response = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static(asset.content_type),
            )],
            asset.body,
        )
            .into_response()
    };
    let headers = response.headers_mut();
    security_headers(headers);
    headers.insert(header::ETAG, etag.clone());
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Public code with nothing secret in it: another origin (the Atlas app) may load the
    // element as a module, which browsers fetch in CORS mode.
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_asset_the_page_names_is_served() {
        let page = std::str::from_utf8(PAGE).unwrap();
        for chunk in page.split(&format!("{ASSETS_PATH}/")).skip(1) {
            let name = chunk.split('"').next().unwrap();
            assert!(
                ASSETS.iter().any(|a| a.name == name),
                "{name} is not embedded"
            );
        }
    }

    #[test]
    fn no_inline_script_style_or_handler_in_the_page() {
        let page = std::str::from_utf8(PAGE).unwrap().to_lowercase();
        assert!(!page.contains("<style"));
        assert!(!page.contains("style="));
        for (at, _) in page.match_indices(" on") {
            let name: String = page[at + 1..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric())
                .collect();
            let after = page[at + 1 + name.len()..].trim_start();
            assert!(!after.starts_with('='), "inline event handler {name}");
        }
        for script in page.split("<script").skip(1) {
            let tag = script.split('>').next().unwrap();
            assert!(tag.contains("src="), "inline script: <script{tag}>");
        }
    }

    /// The page refuses a key with the very sentence the API would answer with.
    #[test]
    fn the_page_speaks_the_apis_sentences() {
        use crate::domain::{Mode, StripeKey};
        use crate::http::error::ApiError;

        let script = include_str!("../../static/connect/key-check.js");
        let mut sentences: Vec<String> = [
            "",
            "xk_test_0123456789",
            "sk_test_0123456789-",
            "sk_test_012",
            "pk_test_0123456789",
            "whsec_0123456789",
            "sk_org_live_0123456789",
        ]
        .iter()
        .map(|raw| StripeKey::parse(raw).expect_err(raw).to_string())
        .collect();
        for (tenant, key) in [(Mode::Test, Mode::Live), (Mode::Live, Mode::Test)] {
            sentences.push(ApiError::ModeMismatch { tenant, key }.to_string());
        }
        for sentence in sentences {
            // The script writes apostrophes escaped inside single quotes.
            let escaped = sentence.replace('\'', "\\'");
            assert!(
                script.contains(&sentence) || script.contains(&escaped),
                "static/connect/key-check.js lacks the API's sentence: {sentence}"
            );
        }
    }
}
