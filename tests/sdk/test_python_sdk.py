"""Stripe's official Python SDK (PyPI `stripe`, pinned in tests/sdk/requirements.txt) as a
charging service uses it, pointed at the proxy with its two settings: the API base
`…/internal/v1/tenants/{id}/stripe` and the service token as the key. Run by scripts/sdk,
which starts the service and the Stripe stand-in (scripts/lib/sdk_stripe.py) and passes:

  SDK_PROXY_BASE      http://127.0.0.1:PORT/internal/v1/tenants
  SDK_TOKEN           a service token with stripe:call
  SDK_STANDIN         the stand-in's base URL (its /__standin/ controls and records)
  SDK_TENANT          the connected tenant these tests use
  SDK_BURST_TENANT    another connected tenant, for the burst that provokes 429
  SDK_VERSIONS        proxy.stripe_versions as the service was started with

Prints one line per test; writes "PASSED FAILED" to the file named by the first argument.
"""

import concurrent.futures
import json
import os
import sys
import traceback
import urllib.request
import uuid

import stripe

PROXY = os.environ["SDK_PROXY_BASE"]
TOKEN = os.environ["SDK_TOKEN"]
STANDIN = os.environ["SDK_STANDIN"]
TENANT = os.environ["SDK_TENANT"]
BURST_TENANT = os.environ["SDK_BURST_TENANT"]
ALLOWED_VERSIONS = os.environ["SDK_VERSIONS"].split(",")
# What the SDK sends unless told otherwise; it must reach Stripe unchanged.
SDK_VERSION = stripe.api_version
RUN = uuid.uuid4().hex[:8]
TELEMETRY = ("x-stripe-client-user-agent", "x-stripe-client-telemetry")


def client(tenant=TENANT, **options):
    """The two settings a charging service changes; retries as the SDK's default user
    would turn them on."""
    options.setdefault("max_network_retries", 2)
    return stripe.StripeClient(
        TOKEN, base_addresses={"api": f"{PROXY}/{tenant}/stripe"}, **options)


def standin(path, method="GET"):
    request = urllib.request.Request(STANDIN + path, method=method, data=b"" if method == "POST" else None)
    with urllib.request.urlopen(request, timeout=10) as answer:
        return json.load(answer)


def arrived(predicate):
    """The requests that reached the stand-in (Stripe) and match `predicate`."""
    return [r for r in standin("/__standin/requests") if predicate(r)]


def header(request, name):
    return next((v for k, v in request["headers"] if k == name), None)


def expect_error(kind, call, status, code, error_type):
    try:
        call()
    except kind as e:
        assert e.http_status == status, f"status {e.http_status}, expected {status}"
        assert e.error is not None, "no error object"
        assert e.error.code == code, f"code {e.error.code!r}, expected {code!r}"
        assert e.error.type == error_type, f"type {e.error.type!r}, expected {error_type!r}"
        return e
    except stripe.StripeError as e:
        raise AssertionError(f"{type(e).__name__} ({e.http_status}, {e.error and e.error.code}), expected {kind.__name__}")
    raise AssertionError(f"no error, expected {kind.__name__}")


TESTS = []


def test(fn):
    TESTS.append(fn)
    return fn


@test
def customers_create_retrieve_update_list():
    s = client().v1.customers
    made = s.create(params={"email": f"py-{RUN}@example.test", "name": "Ada", "metadata": {"run": RUN}})
    assert made.id.startswith("cus_") and made.email == f"py-{RUN}@example.test"
    assert s.retrieve(made.id).name == "Ada"
    changed = s.update(made.id, params={"name": "Ada L.", "metadata": {"plan": "pro"}})
    assert changed.name == "Ada L." and changed.metadata["plan"] == "pro"
    listed = s.list(params={"email": f"py-{RUN}@example.test", "limit": 5})
    assert [c.id for c in listed.data] == [made.id]


@test
def checkout_sessions_create_retrieve_list_expire():
    customer = client().v1.customers.create(params={"email": f"py-cs-{RUN}@example.test"})
    s = client().v1.checkout.sessions
    made = s.create(params={
        "mode": "payment", "customer": customer.id, "success_url": "https://example.test/ok",
        "line_items": [{"price": "price_123", "quantity": 2}]})
    assert made.id.startswith("cs_") and made.status == "open"
    assert s.retrieve(made.id).customer == customer.id
    assert made.id in [x.id for x in s.list(params={"customer": customer.id}).data]
    assert s.expire(made.id).status == "expired"


@test
def coupons_create_retrieve_update_list():
    s = client().v1.coupons
    made = s.create(params={"id": f"PY{RUN}", "percent_off": 25, "duration": "once"})
    assert made.id == f"PY{RUN}" and made.percent_off == 25
    assert s.retrieve(made.id).duration == "once"
    assert s.update(made.id, params={"name": "Quarter off"}).name == "Quarter off"
    assert made.id in [c.id for c in s.list(params={"limit": 100}).data]


@test
def invoice_items_create_retrieve_update_list():
    customer = client().v1.customers.create(params={"email": f"py-ii-{RUN}@example.test"})
    s = client().v1.invoice_items
    made = s.create(params={"customer": customer.id, "amount": 1200, "currency": "eur"})
    assert made.id.startswith("ii_") and made.amount == 1200
    assert s.retrieve(made.id).currency == "eur"
    assert s.update(made.id, params={"description": "Seats"}).description == "Seats"
    assert [x.id for x in s.list(params={"customer": customer.id}).data] == [made.id]


@test
def invoices_create_retrieve_update_list_finalize_pay():
    c = client().v1
    customer = c.customers.create(params={"email": f"py-in-{RUN}@example.test"})
    c.invoice_items.create(params={"customer": customer.id, "amount": 5000, "currency": "usd"})
    made = c.invoices.create(params={"customer": customer.id})
    assert made.status == "draft" and made.amount_due == 5000
    assert c.invoices.retrieve(made.id).customer == customer.id
    assert c.invoices.update(made.id, params={"description": "May"}).description == "May"
    assert [x.id for x in c.invoices.list(params={"customer": customer.id}).data] == [made.id]
    assert c.invoices.finalize_invoice(made.id).status == "open"
    paid = c.invoices.pay(made.id)
    assert paid.status == "paid" and paid.amount_paid == 5000


@test
def stripes_404_is_the_sdks_invalid_request_error():
    e = expect_error(stripe.InvalidRequestError,
                     lambda: client().v1.customers.retrieve("cus_nosuchcustomer"),
                     404, "resource_missing", "invalid_request_error")
    assert e.code == "resource_missing" and e.param == "id"


@test
def stripes_402_is_the_sdks_card_error():
    c = client().v1
    customer = c.customers.create(params={"metadata": {"standin": "decline"}})
    c.invoice_items.create(params={"customer": customer.id, "amount": 700, "currency": "usd"})
    invoice = c.invoices.finalize_invoice(c.invoices.create(params={"customer": customer.id}).id)
    e = expect_error(stripe.CardError, lambda: c.invoices.pay(invoice.id),
                     402, "card_declined", "card_error")
    assert e.code == "card_declined"


@test
def our_403_is_the_sdks_permission_error():
    expect_error(stripe.PermissionError,
                 lambda: client().v1.payouts.create(params={"amount": 100, "currency": "usd"}),
                 403, "endpoint_not_allowed", "invalid_request_error")


@test
def our_404_is_the_sdks_invalid_request_error():
    expect_error(stripe.InvalidRequestError,
                 lambda: client(tenant="ten_neverconnected").v1.customers.list(),
                 404, "not_connected", "invalid_request_error")


@test
def our_429_is_the_sdks_rate_limit_error():
    def one(_):
        try:
            client(tenant=BURST_TENANT, max_network_retries=0).v1.coupons.list(params={"limit": 1})
            return "ok"
        except stripe.RateLimitError as e:
            assert e.http_status == 429
            assert (e.error.code, e.error.type) == ("rate_limited", "rate_limit_error"), (e.error.code, e.error.type)
            return "limited"
    # Well over what proxy.test_requests_per_second lets through within proxy.max_wait_ms.
    with concurrent.futures.ThreadPoolExecutor(max_workers=32) as pool:
        outcomes = list(pool.map(one, range(96)))
    assert "ok" in outcomes and "limited" in outcomes, {o: outcomes.count(o) for o in set(outcomes)}


@test
def a_post_retried_after_a_500_creates_one_object():
    email = f"py-retry-{RUN}@example.test"
    standin("/__standin/fail?count=1", method="POST")
    made = client().v1.customers.create(params={"email": email})
    assert made.email == email
    listed = client().v1.customers.list(params={"email": email})
    assert [c.id for c in listed.data] == [made.id], "one customer, not two"
    posts = arrived(lambda r: r["method"] == "POST" and r["path"] == "/v1/customers"
                    and email.replace("@", "%40") in r["form"])
    keys = {header(r, "idempotency-key") for r in posts}
    assert len(posts) == 2 and len(keys) == 1 and None not in keys, (len(posts), keys)


@test
def the_callers_version_arrives_unchanged_and_telemetry_does_not():
    before = len(standin("/__standin/requests"))
    c = client()
    c.v1.customers.list(params={"limit": 1})
    # The SDK sends its telemetry with the request after one it has timed.
    c.v1.customers.list(params={"limit": 2})
    ours = standin("/__standin/requests")[before:]
    assert len(ours) == 2, f"{len(ours)} requests reached the stand-in"
    for r in ours:
        assert header(r, "stripe-version") == SDK_VERSION, header(r, "stripe-version")
        for name in TELEMETRY:
            assert header(r, name) is None, f"{name} reached Stripe"
        assert (header(r, "authorization") or "").startswith("Bearer rk_test_"), "the tenant's key, not the token"


@test
def without_the_proxy_the_sdk_does_send_its_telemetry():
    # What the test above holds the proxy to: the SDK does send these to Stripe directly.
    before = len(standin("/__standin/requests"))
    direct = stripe.StripeClient("sk_test_direct", base_addresses={"api": STANDIN})
    direct.v1.customers.list(params={"limit": 1})
    direct.v1.customers.list(params={"limit": 1})
    sent = standin("/__standin/requests")[before:]
    assert [header(r, "stripe-version") for r in sent] == [SDK_VERSION] * 2
    for name in TELEMETRY:
        assert header(sent[-1], name) is not None, f"the SDK sent no {name}"


@test
def a_version_the_setting_does_not_list_is_refused_naming_the_allowed_ones():
    e = expect_error(stripe.InvalidRequestError,
                     lambda: client(stripe_version="2025-03-31.basil").v1.customers.list(),
                     400, "invalid_request", "invalid_request_error")
    for version in ALLOWED_VERSIONS:
        assert version in str(e.user_message), e.user_message


@test
def another_account_is_refused_by_name():
    for option, name in (("stripe_account", "Stripe-Account"), ("stripe_context", "Stripe-Context")):
        e = expect_error(stripe.InvalidRequestError,
                         lambda: client().v1.customers.list(options={option: "acct_1Other"}),
                         400, "invalid_request", "invalid_request_error")
        assert name in e.user_message, e.user_message


def main():
    passed = failed = 0
    for fn in TESTS:
        try:
            fn()
        except Exception:  # a test's failure of any kind is reported, and the rest still run
            failed += 1
            print(f"  FAIL python {fn.__name__}")
            traceback.print_exc(limit=3)
        else:
            passed += 1
            print(f"  ok   python {fn.__name__}")
    with open(sys.argv[1], "w") as out:
        out.write(f"{passed} {failed}\n")


if __name__ == "__main__":
    main()
