"""A stand-in for api.stripe.com for scripts/fuzz (Python standard library only).

Answers the five permission probes and the webhook-endpoint calls the service sends, in
Stripe's own shapes, deciding by the key's last four characters (as tests/e2e/fake-stripe.mjs
does, so the fuzzer's connects and verifies reach past 502):

  ...Revk   401 "Invalid API Key provided" on every probe (connect: 422 key_rejected)
  ...NoCp   Coupons denied (403), the rest granted (connect: 422 missing_permissions)
  anything else: every resource granted (404 resource_missing on the probe's made-up id)

Webhook endpoints (create, retrieve, delete) are kept in memory with their signing secret.
`GET /__fake/endpoints` (not a Stripe path) lists them with url and secret, so the fuzz
script can find the connection id in our URL and sign deliveries to it.

    python3 fake_stripe.py PORT      (0: any free port; the port is printed on stdout)
"""

import json
import re
import secrets
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

PROBES = [
    ("customers", re.compile(r"^/v1/customers/(cus_[A-Za-z0-9_]+)$"), "customer"),
    ("checkout_sessions", re.compile(r"^/v1/checkout/sessions/(cs_[A-Za-z0-9_]+)/expire$"), "checkout.session"),
    ("coupons", re.compile(r"^/v1/coupons/([A-Za-z0-9_]+)$"), "coupon"),
    ("invoices", re.compile(r"^/v1/invoices/(in_[A-Za-z0-9_]+)$"), "invoice"),
    ("webhook_endpoints", re.compile(r"^/v1/webhook_endpoints/(we_[A-Za-z0-9_]+)$"), "webhook_endpoint"),
]
ENDPOINT = re.compile(r"^/v1/webhook_endpoints/(we_[A-Za-z0-9]+)$")
DENIED = {"NoCp": {"coupons"}}

endpoints = {}
lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *_):
        pass

    def send(self, status, body):
        text = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(text)))
        self.send_header("Request-Id", "req_" + secrets.token_hex(7))
        self.send_header("Stripe-Version", self.headers.get("Stripe-Version", "2023-08-16"))
        self.end_headers()
        self.wfile.write(text)

    def handle_any(self):
        length = int(self.headers.get("Content-Length") or 0)
        form = parse_qs(self.rfile.read(length).decode("utf-8", "replace"))
        path = urlsplit(self.path).path
        key = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
        last4 = key[-4:]
        if path == "/__fake/endpoints" and self.command == "GET":
            with lock:
                return self.send(200, list(endpoints.values()))
        if path == "/v1/webhook_endpoints" and self.command == "POST":
            endpoint = {
                "id": "we_" + secrets.token_hex(8),
                "object": "webhook_endpoint",
                "url": (form.get("url") or [""])[0],
                "status": "enabled",
                "enabled_events": form.get("enabled_events[]", []),
                "livemode": False,
                "metadata": {},
            }
            secret = "whsec_" + secrets.token_hex(16)
            with lock:
                endpoints[endpoint["id"]] = {**endpoint, "secret": secret}
            return self.send(200, {**endpoint, "secret": secret})
        found = ENDPOINT.match(path)
        if found and self.command in ("GET", "DELETE"):
            with lock:
                stored = endpoints.get(found[1])
                if stored is not None and self.command == "DELETE":
                    del endpoints[found[1]]
            if stored is None:
                return self.send(404, {"error": {
                    "type": "invalid_request_error", "code": "resource_missing", "param": "id",
                    "message": f"No such webhook endpoint: '{found[1]}'"}})
            if self.command == "DELETE":
                return self.send(200, {"id": found[1], "object": "webhook_endpoint", "deleted": True})
            return self.send(200, {k: v for k, v in stored.items() if k != "secret"})
        probe = next((p for p in PROBES if self.command == "POST" and p[1].match(path)), None)
        if probe is None:
            return self.send(404, {"error": {
                "type": "invalid_request_error",
                "message": f"Unrecognized request URL ({self.command}: {path})."}})
        resource, pattern, noun = probe
        if last4 == "Revk":
            return self.send(401, {"error": {
                "type": "invalid_request_error", "message": "Invalid API Key provided."}})
        if resource in DENIED.get(last4, ()):
            return self.send(403, {"error": {
                "type": "invalid_request_error",
                "message": "The provided key does not have the required permissions for this endpoint."}})
        return self.send(404, {"error": {
            "type": "invalid_request_error", "code": "resource_missing", "param": "id",
            "message": f"No such {noun}: '{pattern.match(path)[1]}'"}})

    do_GET = do_POST = do_DELETE = handle_any


if __name__ == "__main__":
    server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
    server.daemon_threads = True
    print(server.server_address[1], flush=True)
    server.serve_forever()
