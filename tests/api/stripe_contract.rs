//! Checks requests sent to Stripe against Stripe's OpenAPI description (API version 2023-08-16).
use serde_json::Value;
use std::sync::OnceLock;

const COMBINATORS: [&str; 3] = ["anyOf", "oneOf", "allOf"];
const FORM: &str = "application/x-www-form-urlencoded";
const DEFAULT_SPEC: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../shared/stripe/openapi-spec3-2023-08-16.json"
);

pub struct StripeSpec {
    doc: Value,
    paths: serde_json::Map<String, Value>,
    api_version: String,
}

impl StripeSpec {
    /// Reads the file named by the STRIPE_OPENAPI_SPEC environment variable, else
    /// `<CARGO_MANIFEST_DIR>/../shared/stripe/openapi-spec3-2023-08-16.json`, once per process.
    /// Panics with a message naming the path when missing or unparsable (tests fail, never skip).
    pub fn load() -> &'static StripeSpec {
        static SPEC: OnceLock<StripeSpec> = OnceLock::new();
        SPEC.get_or_init(|| {
            let path = std::env::var("STRIPE_OPENAPI_SPEC").unwrap_or(DEFAULT_SPEC.to_string());
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("cannot read Stripe OpenAPI spec at {path}: {e}"));
            let doc = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("cannot parse Stripe OpenAPI spec at {path}: {e}"));
            StripeSpec::from_document(doc, &path)
        })
    }

    /// Builds a checker from an already parsed OpenAPI document read from `origin`.
    fn from_document(mut doc: Value, origin: &str) -> StripeSpec {
        let mut take = |pointer| doc.pointer_mut(pointer).map(Value::take);
        let (Some(Value::String(api_version)), Some(Value::Object(paths))) =
            (take("/info/version"), take("/paths"))
        else {
            panic!("Stripe OpenAPI spec at {origin} lacks `info.version` or `paths`");
        };
        StripeSpec {
            doc,
            paths,
            api_version,
        }
    }

    /// The API version the description is for (`info.version`), e.g. "2023-08-16".
    pub fn api_version(&self) -> &str {
        &self.api_version
    }

    /// Checks that `method` exists for the concrete `path` (no query string) and that every key
    /// of the urlencoded `form_body` (a POST body or a GET/DELETE query string) is a parameter
    /// the operation accepts, following Stripe's bracket notation (`a[b][0]`, `a[]`).
    pub fn check(&self, method: &str, path: &str, form_body: &str) -> Result<(), String> {
        let method = method.to_ascii_uppercase();
        let (_, template, ops) = (self.paths.iter())
            .filter_map(|(template, ops)| Some((literal_segments(template, path)?, template, ops)))
            .max_by_key(|(literals, _, _)| *literals)
            .ok_or_else(|| format!("{method} {path}: no such path in Stripe's API"))?;
        let op = ops
            .get(method.to_ascii_lowercase())
            .ok_or_else(|| format!("{method} {path}: method not allowed for path {template}"))?;
        // Parameters come from the form body (POST, some DELETEs) and the query (GET, DELETE).
        let body = op.pointer("/requestBody/content/application~1x-www-form-urlencoded/schema");
        let query: serde_json::Map<String, Value> = (op["parameters"].as_array().into_iter())
            .flatten()
            .filter(|param| param["in"] == "query")
            .filter_map(|param| Some((param["name"].as_str()?.into(), param["schema"].clone())))
            .collect();
        let query = serde_json::json!({ "type": "object", "properties": query });
        let roots = self.alternatives(body.into_iter().chain([&query]));

        for pair in form_body.split('&').filter(|pair| !pair.is_empty()) {
            let key = percent_decode(pair.split('=').next().unwrap_or_default());
            let fail = |why: &str| Err(format!("{method} {path}: form key `{key}` {why}"));
            let Some((name, subkeys)) = split_key(&key) else {
                return fail("is malformed bracket notation");
            };
            let mut current = roots.clone();
            let mut seen = String::new();
            for segment in std::iter::once(name).chain(subkeys) {
                current = self.alternatives(child_schemas(&current, segment));
                seen = match seen.is_empty() {
                    true => segment.to_string(),
                    false => format!("{seen}[{segment}]"),
                };
                if current.is_empty() {
                    return fail(&format!("is unknown to {method} {template} (at `{seen}`)"));
                }
            }
            if current.iter().all(|s| is_array(s) || is_object(s)) {
                return fail("names an array/object in the spec and cannot take a plain value");
            }
        }
        Ok(())
    }

    /// Same check for a request recorded by wiremock: method, url path, query string and body.
    /// A non-empty body must be sent as `application/x-www-form-urlencoded`.
    pub fn check_request(&self, request: &wiremock::Request) -> Result<(), String> {
        let (method, path) = (request.method.as_str(), request.url.path());
        let body = std::str::from_utf8(&request.body)
            .map_err(|e| format!("{method} {path}: request body is not UTF-8: {e}"))?;
        let header = request.headers.get("content-type");
        let content_type = header.and_then(|v| v.to_str().ok()).unwrap_or_default();
        let media_type = content_type.split(';').next().unwrap_or_default().trim();
        if !body.is_empty() && !media_type.eq_ignore_ascii_case(FORM) {
            return Err(format!(
                "{method} {path}: body sent with content-type `{content_type}`, not {FORM}"
            ));
        }
        // Stripe reads parameters from the query string as well as the body, so check both.
        self.check(method, path, request.url.query().unwrap_or_default())?;
        self.check(method, path, body)
    }

    /// Resolves local `$ref`s and flattens `anyOf`/`oneOf`/`allOf` into concrete alternatives.
    fn alternatives<'a>(&'a self, schemas: impl IntoIterator<Item = &'a Value>) -> Vec<&'a Value> {
        let mut stack: Vec<(&Value, usize)> = schemas.into_iter().map(|s| (s, 0)).collect();
        let mut out = Vec::new();
        while let Some((schema, depth)) = stack.pop() {
            assert!(depth < 64, "Stripe spec: $ref/anyOf nested too deep");
            if let Some(reference) = schema["$ref"].as_str() {
                let target = reference
                    .strip_prefix('#')
                    .and_then(|p| self.doc.pointer(p));
                let target = target.unwrap_or_else(|| panic!("spec has dangling $ref {reference}"));
                stack.push((target, depth + 1));
                continue;
            }
            match COMBINATORS.iter().find_map(|k| schema[k].as_array()) {
                Some(choices) => stack.extend(choices.iter().map(|s| (s, depth + 1))),
                None => out.push(schema),
            }
        }
        out
    }
}

fn is_array(schema: &Value) -> bool {
    schema["type"] == "array" || schema.get("items").is_some()
}

fn is_object(schema: &Value) -> bool {
    let has = |field| schema.get(field).is_some();
    schema["type"] == "object" || has("properties") || has("additionalProperties")
}

/// Schemas reachable from `alternatives` through one bracket segment (`""` for `[]`).
fn child_schemas<'a>(alternatives: &[&'a Value], segment: &str) -> Vec<&'a Value> {
    static ANYTHING: Value = Value::Null; // for `additionalProperties: true`
    let is_index = segment.bytes().all(|b| b.is_ascii_digit()); // also true for `[]`
    let mut out = Vec::new();
    for &schema in alternatives {
        if is_index && is_array(schema) {
            out.extend(schema.get("items"));
        }
        if segment.is_empty() || !is_object(schema) {
            continue;
        }
        let extra = &schema["additionalProperties"];
        match (schema["properties"].get(segment), extra) {
            (Some(property), _) => out.push(property),
            (None, extra @ Value::Object(_)) => out.push(extra),
            (None, Value::Bool(true)) => out.push(&ANYTHING),
            (None, _) => {}
        }
    }
    out
}

/// Number of literal segments when `template` (e.g. `/v1/customers/{customer}`) matches `path`.
fn literal_segments(template: &str, path: &str) -> Option<usize> {
    let (template, path): (Vec<_>, Vec<_>) =
        (template.split('/').collect(), path.split('/').collect());
    if template.len() != path.len() {
        return None;
    }
    template.iter().zip(path).try_fold(0, |literals, (t, p)| {
        let is_param = t.starts_with('{') && t.ends_with('}');
        match (is_param, *t == p) {
            (true, _) if !p.is_empty() => Some(literals),
            (false, true) => Some(literals + 1),
            _ => None,
        }
    })
}

/// Splits `a[b][c]` into `("a", ["b", "c"])`; `None` when the brackets are malformed.
fn split_key(key: &str) -> Option<(&str, Vec<&str>)> {
    let (name, mut rest) = key.split_at(key.find('[').unwrap_or(key.len()));
    let mut subkeys = Vec::new();
    while !rest.is_empty() {
        let (inner, tail) = rest.strip_prefix('[')?.split_once(']')?;
        subkeys.push(inner);
        rest = tail;
    }
    (!name.is_empty()).then_some((name, subkeys))
}

/// Decodes `application/x-www-form-urlencoded` text: `+` is a space, `%XX` a byte.
fn percent_decode(s: &str) -> String {
    let (bytes, mut out, mut i) = (s.as_bytes(), Vec::with_capacity(s.len()), 0);
    while i < bytes.len() {
        let hex = s
            .get(i + 1..i + 3)
            .filter(|hex| hex.bytes().all(|b| b.is_ascii_hexdigit()));
        match (bytes[i], hex) {
            (b'%', Some(hex)) => {
                out.push(u8::from_str_radix(hex, 16).expect("two hex digits fit in a u8"));
                i += 2;
            }
            (b'+', _) => out.push(b' '),
            (byte, _) => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Runs `check` for a request line such as `"POST /v1/customers/cus_x"`.
fn check_line(request_line: &str, body: &str) -> Result<(), String> {
    let (method, path) = request_line.split_once(' ').expect("`METHOD /path`");
    StripeSpec::load().check(method, path, body)
}

fn accepted(request_line: &str, body: &str) {
    if let Err(e) = check_line(request_line, body) {
        panic!("expected {request_line} with `{body}` to be accepted, got: {e}");
    }
}

fn rejected(request_line: &str, body: &str, expected_in_error: &str) {
    let e = check_line(request_line, body).expect_err(&format!("{request_line} `{body}`"));
    assert!(
        e.contains(expected_in_error),
        "`{e}` should mention `{expected_in_error}`"
    );
}

fn recorded(method: &str, url: &str, content_type: &str, body: &str) -> wiremock::Request {
    let mut request = wiremock::Request {
        url: url.parse().expect("test URL is valid"),
        method: method.parse().expect("test method is valid"),
        headers: Default::default(),
        body: body.as_bytes().to_vec(),
    };
    if !content_type.is_empty() {
        let content_type = content_type.parse().expect("valid content-type");
        request.headers.insert("content-type", content_type);
    }
    request
}

#[test]
fn spec_is_for_api_version_2023_08_16() {
    assert_eq!(StripeSpec::load().api_version(), "2023-08-16");
}

#[test]
fn customer_update_accepts_known_params_and_rejects_unknown() {
    let update = "POST /v1/customers/cus_x";
    accepted(update, "");
    accepted(update, "name=a&metadata[k]=v");
    accepted(update, "metadata%5Btenant_id%5D=t+1&address[city]=Oslo");
    // `metadata` and `address` also allow the empty string (to unset them).
    accepted(update, "metadata=&address=");
    rejected(update, "nonexistent_param=1", "`nonexistent_param`");
    rejected(update, "address[planet]=Mars", "address[planet]");
    rejected(update, "metadata[a][b]=1", "metadata[a][b]");
}

#[test]
fn empty_posts_to_existing_endpoints_are_accepted() {
    accepted("POST /v1/checkout/sessions/cs_x/expire", "");
    accepted("POST /v1/coupons/atlasprobe123", "");
    accepted("POST /v1/invoices/in_x", "");
    accepted("POST /v1/webhook_endpoints/we_x", "");
}

#[test]
fn webhook_endpoint_create_body_is_accepted() {
    let create = "POST /v1/webhook_endpoints";
    let body = "url=https%3A%2F%2Fa.example%2Fw&enabled_events[]=invoice.paid\
                &enabled_events[]=checkout.session.completed&api_version=2023-08-16\
                &description=x&metadata[tenant_id]=t1";
    accepted(create, body);
    // The spec describes `enabled_events` only as `type: array` (items: enum of event names),
    // with no string alternative, so a plain `enabled_events=x` is rejected.
    rejected(create, "url=u&enabled_events=x", "`enabled_events`");
}

#[test]
fn webhook_endpoint_get_and_delete_are_accepted() {
    accepted("DELETE /v1/webhook_endpoints/we_x", "");
    accepted("GET /v1/webhook_endpoints/we_x", "");
    accepted("GET /v1/webhook_endpoints/we_x", "expand[]=x");
    rejected("GET /v1/webhook_endpoints/we_x", "limit=3", "`limit`");
}

#[test]
fn nested_keys_and_query_parameters_are_resolved() {
    let (session, invoices) = ("POST /v1/checkout/sessions", "GET /v1/invoices");
    let line_items = "mode=payment&line_items[0][price]=p&line_items[0][quantity]=2";
    accepted(session, line_items);
    rejected(session, "line_items[0][bogus]=1", "line_items[0][bogus]");
    rejected(session, "line_items[0]=1", "plain value");
    rejected(session, "line_items[0=1", "malformed");
    accepted(invoices, "created[gte]=1&limit=3&expand[]=data.customer");
    rejected(invoices, "created[bogus]=1", "created[bogus]");
    // Some DELETE operations take form parameters too.
    let cancel = "DELETE /v1/subscriptions/sub_x";
    accepted(cancel, "invoice_now=true&cancellation_details[comment]=c");
    // `/v1/customers/search` (literal) wins over `/v1/customers/{customer}`, which has no `query`.
    accepted("GET /v1/customers/search", "query=email%3A%27a%40b.c%27");
}

#[test]
fn refs_and_one_of_are_followed() {
    // Stripe's request schemas are all inline today, so exercise `$ref`/`oneOf` on a tiny spec.
    use serde_json::json;
    let tag = json!({ "type": "object", "properties": { "name": { "type": "string" } } });
    let tags = json!({ "type": "array", "items": { "$ref": "#/components/schemas/tag" } });
    let params = json!({ "type": "object", "properties": { "tags": { "oneOf": [tags] } } });
    let form = json!({ "schema": { "$ref": "#/components/schemas/params" } });
    let post = json!({ "requestBody": { "content": { FORM: form } } });
    let doc = json!({
        "info": { "version": "test" },
        "paths": { "/v1/things/{thing}": { "post": post } },
        "components": { "schemas": { "params": params, "tag": tag } },
    });
    let spec = StripeSpec::from_document(doc, "an inline test document");
    let check = |body| spec.check("POST", "/v1/things/t_1", body);
    assert_eq!(check("tags[0][name]=a&tags[][name]=b"), Ok(()));
    assert!(check("tags[0][id]=a").is_err_and(|e| e.contains("tags[0][id]")));
    assert!(check("tags[name]=a").is_err_and(|e| e.contains("tags[name]")));
}

#[test]
fn unknown_paths_and_methods_are_rejected() {
    rejected("POST /v1/nonexistent", "", "no such path");
    rejected("POST /v1/customers/", "", "no such path");
    rejected("PUT /v1/customers/cus_x", "", "method not allowed for path");
}

#[test]
fn recorded_requests_are_checked() {
    let spec = StripeSpec::load();
    let form = "application/x-www-form-urlencoded; charset=utf-8";
    let customer = "http://localhost/v1/customers/cus_x";
    let ok = recorded("POST", customer, form, "name=a&metadata%5Bk%5D=v");
    assert_eq!(spec.check_request(&ok), Ok(()));
    let json = recorded("POST", customer, "application/json", "{}");
    let json_error = spec.check_request(&json).expect_err("JSON body");
    assert!(json_error.contains("content-type"), "{json_error}");
    let invoices = "http://localhost/v1/invoices?limit=3&expand%5B%5D=data.customer";
    let get = recorded("GET", invoices, "", "");
    assert_eq!(spec.check_request(&get), Ok(()));
    let bogus = "http://localhost/v1/webhook_endpoints/we_x?bogus=1";
    let bogus_error = spec.check_request(&recorded("DELETE", bogus, "", ""));
    let bogus_error = bogus_error.expect_err("unknown query key");
    assert!(bogus_error.contains("`bogus`"), "{bogus_error}");
}
