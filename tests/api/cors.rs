//! Browsers on the Atlas app's origin: exactly the configured origins may call the
//! tenant-facing routes; nothing else answers a preflight.

use reqwest::Method;

use crate::backend_tests;
use crate::helpers::{spawn_app_with, Backend, TestApp};

backend_tests!(only_configured_origins_reach_the_tenant_routes);

const ALLOWED: &str = "https://app.atlas.example";
/// The second configured origin: every configured origin is honoured, not only the first.
const ALSO_ALLOWED: &str = "https://admin.atlas.example";
const REFUSED: &str = "https://evil.example";

async fn preflight(app: &TestApp, path: &str, origin: &str) -> reqwest::Response {
    app.http
        .request(Method::OPTIONS, app.url(path))
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization, content-type",
        )
        .send()
        .await
        .unwrap()
}

fn allowed_origin(response: &reqwest::Response) -> Option<String> {
    (response.headers().get("access-control-allow-origin")).map(|v| v.to_str().unwrap().to_owned())
}

async fn only_configured_origins_reach_the_tenant_routes(backend: Backend) {
    let app = spawn_app_with(
        backend,
        &[(
            "server.cors_allowed_origins",
            &format!("{ALLOWED},{ALSO_ALLOWED}"),
        )],
    )
    .await;
    app.create_tenant("ten_1", atlas_stripe::domain::Mode::Test)
        .await;
    let connection = TestApp::connection_path("ten_1");

    let ok = preflight(&app, &connection, ALLOWED).await;
    assert!(ok.status().is_success(), "{}", ok.status());
    assert_eq!(allowed_origin(&ok).as_deref(), Some(ALLOWED));
    let methods = ok.headers()["access-control-allow-methods"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        methods.contains("POST") && methods.contains("DELETE"),
        "{methods}"
    );
    assert!(!methods.contains("PUT"), "{methods}");
    let headers = ok.headers()["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_lowercase();
    assert!(headers.contains("authorization") && headers.contains("content-type"));
    assert!(ok
        .headers()
        .get("access-control-allow-credentials")
        .is_none());

    let second = preflight(&app, &connection, ALSO_ALLOWED).await;
    assert!(second.status().is_success(), "{}", second.status());
    assert_eq!(allowed_origin(&second).as_deref(), Some(ALSO_ALLOWED));

    let refused = preflight(&app, &connection, REFUSED).await;
    assert_eq!(allowed_origin(&refused), None);
    // Issue 21: an OPTIONS without an allowed Origin (none, or another) got the allowed
    // methods and headers. It gets no CORS header at all.
    let no_origin = (app.http)
        .request(Method::OPTIONS, app.url(&connection))
        .send()
        .await
        .unwrap();
    for answer in [&refused, &no_origin] {
        let cors: Vec<_> = (answer.headers().keys())
            .filter(|name| name.as_str().starts_with("access-control-"))
            .collect();
        assert!(cors.is_empty(), "{cors:?}");
        assert_eq!(answer.status(), 405);
    }

    // The actual request, with the tenant token, from each origin.
    let get = |origin: &'static str| {
        app.http
            .get(app.url(&connection))
            .bearer_auth(app.tenant_token("ten_1"))
            .header("origin", origin)
            .send()
    };
    let from_allowed = get(ALLOWED).await.unwrap();
    assert_eq!(from_allowed.status(), 404, "not connected yet");
    assert_eq!(allowed_origin(&from_allowed).as_deref(), Some(ALLOWED));
    let exposed = from_allowed.headers()["access-control-expose-headers"]
        .to_str()
        .unwrap()
        .to_lowercase();
    assert!(exposed.contains("x-request-id"), "{exposed}");
    let from_second = get(ALSO_ALLOWED).await.unwrap();
    assert_eq!(from_second.status(), 404, "not connected yet");
    assert_eq!(allowed_origin(&from_second).as_deref(), Some(ALSO_ALLOWED));
    assert_eq!(allowed_origin(&get(REFUSED).await.unwrap()), None);

    // Internal, webhook and ops routes never answer a preflight, whatever the origin.
    for path in [
        "/internal/v1/tenants/ten_1/stripe/key",
        "/internal/v1/connections",
        "/webhooks/stripe/con_x",
        "/metrics",
        "/readyz",
    ] {
        let response = preflight(&app, path, ALLOWED).await;
        assert_eq!(allowed_origin(&response), None, "{path}");
        assert!(response.status().is_client_error(), "{path}");
    }
}
