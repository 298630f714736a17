//! The reference connect page (`/connect/stripe`) and its assets: served from the binary
//! with a strict Content-Security-Policy. It talks to no database, so SQLite suffices; the
//! browser tests are `scripts/e2e`.

use crate::helpers::{assert_error, spawn_app, Backend};

fn header(response: &reqwest::Response, name: &str) -> String {
    response
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

fn assert_locked_down(response: &reqwest::Response) {
    let csp = header(response, "content-security-policy");
    for directive in [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
        "require-trusted-types-for 'script'",
    ] {
        assert!(csp.contains(directive), "CSP lacks {directive}: {csp}");
    }
    assert!(!csp.contains("unsafe-"), "{csp}");
    assert_eq!(header(response, "x-content-type-options"), "nosniff");
    assert_eq!(header(response, "referrer-policy"), "no-referrer");
    assert_eq!(header(response, "x-frame-options"), "DENY");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_and_its_assets_are_served_locked_down() {
    let app = spawn_app(Backend::Sqlite).await;
    let page = app
        .http
        .get(app.url("/connect/stripe"))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    assert_locked_down(&page);
    assert_eq!(header(&page, "content-type"), "text/html; charset=utf-8");
    assert_eq!(header(&page, "cache-control"), "no-store");
    let html = page.text().await.unwrap();
    assert!(html.contains("<atlas-stripe-connect"));

    for (name, content_type) in [
        ("atlas-stripe-connect.js", "text/javascript; charset=utf-8"),
        ("key-check.js", "text/javascript; charset=utf-8"),
        ("api.js", "text/javascript; charset=utf-8"),
        ("demo.js", "text/javascript; charset=utf-8"),
        ("connect.css", "text/css; charset=utf-8"),
        ("page.css", "text/css; charset=utf-8"),
        ("icon.svg", "image/svg+xml"),
    ] {
        let url = app.url(&format!("/connect/stripe/assets/{name}"));
        let asset = app.http.get(&url).send().await.unwrap();
        assert_eq!(asset.status(), 200, "{name}");
        assert_locked_down(&asset);
        assert_eq!(header(&asset, "content-type"), content_type, "{name}");
        assert_eq!(header(&asset, "cache-control"), "no-cache", "{name}");
        let etag = header(&asset, "etag");
        assert!(etag.starts_with('"') && etag.len() > 10, "{name}: {etag}");
        assert!(!asset.bytes().await.unwrap().is_empty());
        let again = app
            .http
            .get(&url)
            .header("if-none-match", &etag)
            .send()
            .await
            .unwrap();
        assert_eq!(again.status(), 304, "{name} revalidates");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_assets_and_methods_get_the_api_error_shape() {
    let app = spawn_app(Backend::Sqlite).await;
    for path in [
        "/connect/stripe/assets/nothing.js",
        "/connect/stripe/assets/..%2FCargo.toml",
        "/connect/stripe/nothing",
    ] {
        let response = app.http.get(app.url(path)).send().await.unwrap();
        assert_error(response, 404, "not_found").await;
    }
    let post = app
        .http
        .post(app.url("/connect/stripe"))
        .send()
        .await
        .unwrap();
    assert_error(post, 405, "method_not_allowed").await;
}
