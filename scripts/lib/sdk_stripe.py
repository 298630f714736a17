"""A stand-in for api.stripe.com for scripts/sdk (Python standard library only).

It keeps, per API key (one per connected account), the five resources the proxy's
allowlist forwards, in memory, and answers as Stripe does:

  customers            create, retrieve, update, list (filter: email)
  checkout sessions    create, retrieve, list, expire (filter: customer)
  coupons              create (id chosen or made), retrieve, update, list
  invoices             create, retrieve, update, list, delete (a draft), finalize, pay
                       (filter: customer)
  invoice items        create, retrieve, update, list, delete (filter: customer, invoice)

- An unknown id: 404 `resource_missing` (type invalid_request_error, param id).
- Paying an invoice whose customer has `metadata[standin]=decline`: 402 card_error
  `card_declined`, as Stripe answers a declined card.
- `Idempotency-Key`: a POST with a key seen before (same account) replays the first answer
  with `Idempotent-Replayed: true` and creates nothing; other parameters under the same
  key: 400 idempotency_error.
- `POST /__standin/fail?count=N` (not a Stripe path): the next N POSTs are carried out, then
  answered 500 api_error, as when Stripe's answer is lost after the object was made; their
  idempotent result is the real one, so a retry under the same key gets the object and
  creates no second one.
- Every request is recorded: `GET /__standin/requests` lists method, path, query, form and
  headers (names in lower case); `GET /__standin/counts` counts the objects made, by kind.

    python3 sdk_stripe.py PORT      (0: any free port; the port is printed on stdout)
"""

import json
import re
import secrets
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

PREFIXES = {
    "customer": "cus_",
    "checkout.session": "cs_test_",
    "coupon": "",
    "invoice": "in_",
    "invoiceitem": "ii_",
}
COLLECTIONS = {
    "customers": "customer",
    "checkout/sessions": "checkout.session",
    "coupons": "coupon",
    "invoices": "invoice",
    "invoiceitems": "invoiceitem",
}
NOUNS = {
    "customer": "customer",
    "checkout.session": "checkout.session",
    "coupon": "coupon",
    "invoice": "invoice",
    "invoiceitem": "invoiceitem",
}
# Form fields Stripe reads as integers.
INTEGERS = {"amount", "amount_off", "duration_in_months", "quantity", "unit_amount", "limit",
            "max_redemptions", "days_until_due"}
NUMBERS = {"percent_off"}
ROUTE = re.compile(
    r"^/v1/(?P<collection>customers|checkout/sessions|coupons|invoices|invoiceitems)"
    r"(?:/(?P<id>[A-Za-z0-9_-]+)(?:/(?P<action>finalize|pay|expire))?)?$")

lock = threading.RLock()
accounts = {}        # api key -> {"objects": {kind: {id: object}}, "idempotent": {key: (form, status, body)}}
requests_seen = []
counts = {}
fail_next = {"count": 0}


class StripeError(Exception):
    def __init__(self, status, error):
        super().__init__(error.get("message", ""))
        self.status = status
        self.error = error


def missing(kind, object_id):
    return StripeError(404, {
        "type": "invalid_request_error", "code": "resource_missing", "param": "id",
        "message": f"No such {NOUNS[kind]}: '{object_id}'",
        "doc_url": "https://stripe.com/docs/error-codes/resource-missing"})


def invalid(message, param=None, code=None):
    error = {"type": "invalid_request_error", "message": message}
    if param:
        error["param"] = param
    if code:
        error["code"] = code
    return StripeError(400, error)


def scalar(name, value):
    if name in INTEGERS:
        try:
            return int(value)
        except ValueError:
            raise invalid(f"Invalid integer: {value}", name)
    if name in NUMBERS:
        try:
            return float(value)
        except ValueError:
            raise invalid(f"Invalid decimal: {value}", name)
    if value in ("true", "false"):
        return value == "true"
    return value


def parse_form(text):
    """Stripe's bracket notation (`metadata[a]=1`, `line_items[0][price]=p`, `expand[]=x`)
    into nested dicts and lists."""
    form = {}
    for name, value in parse_qsl(text, keep_blank_values=True):
        shape = re.match(r"^([^\[\]]+)((?:\[[^\[\]]*\])*)$", name)
        if shape is None:
            raise invalid(f"Invalid parameter name: {name}")
        keys = [shape[1]] + re.findall(r"\[([^\[\]]*)\]", shape[2])
        # Metadata values stay strings, whatever they look like.
        leaf = value if keys[0] == "metadata" else scalar(keys[-1] or keys[-2], value)
        node = form
        for i, key in enumerate(keys):
            if i + 1 < len(keys) and keys[i + 1] == "":
                node.setdefault(key, []).append(leaf)
                break
            if i + 1 == len(keys):
                node[key] = leaf
            else:
                node = node.setdefault(key, {})
    return indexed_to_lists(form)


def indexed_to_lists(value):
    if isinstance(value, dict):
        value = {k: indexed_to_lists(v) for k, v in value.items()}
        if value and all(k.isdigit() for k in value):
            return [value[k] for k in sorted(value, key=int)]
    return value


def new_id(kind):
    return PREFIXES[kind] + secrets.token_hex(8)


def make(account, kind, form):
    now = int(time.time())
    base = {"object": kind, "created": now, "livemode": False,
            "metadata": dict(form.get("metadata") or {})}
    if kind == "customer":
        obj = {**base, "id": new_id(kind), "email": form.get("email"), "name": form.get("name"),
               "description": form.get("description"), "balance": 0, "currency": None,
               "delinquent": False, "invoice_prefix": secrets.token_hex(4).upper()}
    elif kind == "checkout.session":
        for required in ("mode", "success_url"):
            if required not in form:
                raise invalid(f"Missing required param: {required}.", required,
                              "parameter_missing")
        obj = {**base, "id": new_id(kind), "mode": form["mode"],
               "success_url": form["success_url"], "cancel_url": form.get("cancel_url"),
               "customer": form.get("customer"), "status": "open", "payment_status": "unpaid",
               "url": "https://checkout.stripe.com/c/pay/" + secrets.token_hex(12),
               "expires_at": now + 86400}
        if obj["customer"]:
            find(account, "customer", obj["customer"])
    elif kind == "coupon":
        if "percent_off" not in form and "amount_off" not in form:
            raise invalid("Coupons require either amount_off or percent_off.", "percent_off")
        object_id = form.get("id") or secrets.token_hex(4)
        if object_id in account["objects"].setdefault(kind, {}):
            raise invalid(f"Coupon already exists.", "id", "resource_already_exists")
        obj = {**base, "id": object_id, "name": form.get("name"),
               "percent_off": form.get("percent_off"), "amount_off": form.get("amount_off"),
               "currency": form.get("currency"), "duration": form.get("duration", "once"),
               "duration_in_months": form.get("duration_in_months"), "valid": True,
               "times_redeemed": 0}
    elif kind == "invoice":
        customer = form.get("customer")
        if not customer:
            raise invalid("Missing required param: customer.", "customer", "parameter_missing")
        find(account, "customer", customer)
        obj = {**base, "id": new_id(kind), "customer": customer, "status": "draft",
               "currency": form.get("currency", "usd"), "amount_due": 0, "amount_paid": 0,
               "auto_advance": form.get("auto_advance", False),
               "collection_method": form.get("collection_method", "charge_automatically"),
               "description": form.get("description"), "paid": False}
        # As with pending_invoice_items_behavior=include: the customer's pending items.
        for item in account["objects"].get("invoiceitem", {}).values():
            if item["customer"] == customer and item["invoice"] is None:
                item["invoice"] = obj["id"]
        obj["amount_due"] = invoice_total(account, obj["id"])
    elif kind == "invoiceitem":
        customer = form.get("customer")
        if not customer:
            raise invalid("Missing required param: customer.", "customer", "parameter_missing")
        find(account, "customer", customer)
        if "amount" not in form:
            raise invalid("Missing required param: amount.", "amount", "parameter_missing")
        invoice = form.get("invoice")
        if invoice:
            draft(find(account, "invoice", invoice))
        obj = {**base, "id": new_id(kind), "customer": customer, "amount": form["amount"],
               "currency": form.get("currency", "usd"), "description": form.get("description"),
               "invoice": invoice}
        if invoice:
            account["objects"]["invoice"][invoice]["amount_due"] += obj["amount"]
    else:
        raise AssertionError(kind)
    account["objects"].setdefault(kind, {})[obj["id"]] = obj
    with lock:
        counts[kind] = counts.get(kind, 0) + 1
    return obj


def invoice_total(account, invoice_id):
    return sum(item["amount"] for item in account["objects"].get("invoiceitem", {}).values()
               if item["invoice"] == invoice_id)


def draft(invoice):
    if invoice["status"] != "draft":
        raise invalid(f"This invoice is {invoice['status']}; only a draft invoice can be changed.",
                      code="invoice_not_editable")
    return invoice


def find(account, kind, object_id):
    found = account["objects"].get(kind, {}).get(object_id)
    if found is None:
        raise missing(kind, object_id)
    return found


UPDATABLE = {
    "customer": {"email", "name", "description", "metadata"},
    "coupon": {"name", "metadata"},
    "invoice": {"description", "metadata", "auto_advance", "collection_method"},
    "invoiceitem": {"amount", "description", "metadata"},
}


def update(account, kind, obj, form):
    if kind == "invoice" and set(form) - {"metadata"}:
        draft(obj)
    unknown = set(form) - UPDATABLE[kind] - {"expand"}
    if unknown:
        name = sorted(unknown)[0]
        raise invalid(f"Received unknown parameter: {name}", name)
    for name, value in form.items():
        if name == "metadata":
            obj["metadata"].update(value)
            obj["metadata"] = {k: v for k, v in obj["metadata"].items() if v != ""}
        elif name != "expand":
            if kind == "invoiceitem" and name == "amount" and obj["invoice"]:
                invoice = draft(account["objects"]["invoice"][obj["invoice"]])
                invoice["amount_due"] += value - obj["amount"]
            obj[name] = value
    return obj


def act(account, kind, obj, action):
    if kind == "invoice" and action == "finalize":
        draft(obj)
        obj["status"] = "open"
        obj["number"] = "STANDIN-" + secrets.token_hex(3).upper()
        return obj
    if kind == "invoice" and action == "pay":
        if obj["status"] != "open":
            raise invalid(f"Invoice is {obj['status']}; only an open invoice can be paid.",
                          code="invoice_not_open" if obj["status"] == "draft" else None)
        customer = find(account, "customer", obj["customer"])
        if customer["metadata"].get("standin") == "decline":
            raise StripeError(402, {
                "type": "card_error", "code": "card_declined", "decline_code": "generic_decline",
                "message": "Your card was declined.", "charge": "ch_" + secrets.token_hex(8),
                "doc_url": "https://stripe.com/docs/error-codes/card-declined"})
        obj.update(status="paid", paid=True, amount_paid=obj["amount_due"])
        return obj
    if kind == "checkout.session" and action == "expire":
        if obj["status"] != "open":
            raise invalid("Only Checkout Sessions with a status of open can be expired.")
        obj["status"] = "expired"
        return obj
    raise invalid(f"Unrecognized request URL (POST: {action}).")


def listing(account, kind, path, query):
    items = sorted(account["objects"].get(kind, {}).values(),
                   key=lambda o: (o["created"], o["id"]), reverse=True)
    for name in ("email", "customer", "invoice", "status"):
        if name in query:
            items = [o for o in items if o.get(name) == query[name]]
    after = query.get("starting_after")
    if after:
        ids = [o["id"] for o in items]
        if after not in ids:
            raise missing(kind, after)
        items = items[ids.index(after) + 1:]
    limit = query.get("limit", 10)
    if not 1 <= limit <= 100:
        raise invalid("Invalid limit: must be between 1 and 100.", "limit")
    return {"object": "list", "data": items[:limit], "has_more": len(items) > limit,
            "url": path}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *_):
        pass

    def send(self, status, body, extra=()):
        text = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(text)))
        self.send_header("Request-Id", "req_" + secrets.token_hex(7))
        version = self.headers.get("Stripe-Version")
        if version:
            self.send_header("Stripe-Version", version)
        for name, value in extra:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(text)

    def handle_any(self):
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length).decode("utf-8", "replace")
        url = urlsplit(self.path)
        path = url.path
        if path.startswith("/__standin/"):
            return self.control(path, dict(parse_qsl(url.query)))
        with lock:
            requests_seen.append({
                "method": self.command, "path": path, "query": url.query, "form": raw,
                "headers": [[k.lower(), v] for k, v in self.headers.items()]})
        key = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
        if not key.startswith(("sk_test_", "rk_test_", "sk_live_", "rk_live_")):
            return self.send(401, {"error": {
                "type": "invalid_request_error",
                "message": "Invalid API Key provided."}})
        try:
            form = parse_form(raw if self.command == "POST" else url.query)
        except StripeError as e:
            return self.send(e.status, {"error": e.error})
        idempotency_key = self.headers.get("Idempotency-Key") if self.command == "POST" else None
        with lock:
            account = accounts.setdefault(key, {"objects": {}, "idempotent": {}})
            if idempotency_key is not None:
                seen = account["idempotent"].get(idempotency_key)
                if seen is not None:
                    first_form, status, body = seen
                    if first_form != (path, form):
                        return self.send(400, {"error": {
                            "type": "idempotency_error",
                            "message": "Keys for idempotent requests can only be used with the "
                                       "same parameters they were first used with."}})
                    return self.send(status, body, [("Idempotent-Replayed", "true"),
                                                    ("Idempotency-Key", idempotency_key)])
            try:
                status, body = 200, self.route(account, path, form)
            except StripeError as e:
                status, body = e.status, {"error": e.error}
            if idempotency_key is not None:
                account["idempotent"][idempotency_key] = ((path, form), status, body)
            lost = self.command == "POST" and fail_next["count"] > 0
            if lost:
                fail_next["count"] -= 1
        extra = [("Idempotency-Key", idempotency_key)] if idempotency_key else []
        if lost:
            return self.send(500, {"error": {
                "type": "api_error",
                "message": "An unknown error occurred (the stand-in lost this answer)."}}, extra)
        return self.send(status, body, extra)

    def route(self, account, path, form):
        found = ROUTE.match(path)
        if found is None:
            raise StripeError(404, {"type": "invalid_request_error",
                                    "message": f"Unrecognized request URL ({self.command}: {path})."})
        kind = COLLECTIONS[found["collection"]]
        object_id, action = found["id"], found["action"]
        method = self.command
        if object_id is None:
            if method == "GET":
                return listing(account, kind, path, form)
            if method == "POST":
                return make(account, kind, form)
        elif action is not None:
            if method == "POST":
                return act(account, kind, find(account, kind, object_id), action)
        elif method == "GET":
            return find(account, kind, object_id)
        elif method == "POST":
            if kind == "checkout.session":
                raise StripeError(404, {"type": "invalid_request_error",
                                        "message": f"Unrecognized request URL (POST: {path})."})
            return update(account, kind, find(account, kind, object_id), form)
        elif method == "DELETE" and kind in ("invoice", "invoiceitem", "customer", "coupon"):
            obj = find(account, kind, object_id)
            if kind == "invoice":
                draft(obj)
            del account["objects"][kind][object_id]
            return {"id": object_id, "object": kind, "deleted": True}
        raise StripeError(404, {"type": "invalid_request_error",
                                "message": f"Unrecognized request URL ({method}: {path})."})

    def control(self, path, query):
        if path == "/__standin/requests" and self.command == "GET":
            with lock:
                return self.send(200, list(requests_seen))
        if path == "/__standin/counts" and self.command == "GET":
            with lock:
                return self.send(200, dict(counts))
        if path == "/__standin/fail" and self.command == "POST":
            with lock:
                fail_next["count"] = int(query.get("count", "1"))
            return self.send(200, {"fail_next": fail_next["count"]})
        return self.send(404, {"error": {"type": "invalid_request_error",
                                         "message": f"no stand-in control {path}"}})

    do_GET = do_POST = do_DELETE = handle_any


if __name__ == "__main__":
    server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
    server.daemon_threads = True
    print(server.server_address[1], flush=True)
    server.serve_forever()
