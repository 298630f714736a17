"""scripts/chaos: three instances of the service on one throwaway PostgreSQL, a stateful
Stripe stand-in and an announcement receiver, a mixed load over ~200 tenants while faults
are injected (kill -9 of an instance every few seconds, one immediate-mode PostgreSQL
restart, Stripe answering 429/500 in bursts, a master-key rewrap killed once and resumed);
then each invariant is checked against the stand-in's records and the database, one line
each, and `N passed, M failed` (issue 27). Python 3 standard library only; the database is
read with psql.

The seed picks the fault schedule (printed at the start): the same seed replays the same
faults at the same times. The load is drawn from the seed too, but threads interleave as
the machine lets them, so only the faults replay exactly.
"""

import argparse
import base64
import collections
import hashlib
import hmac
import json
import os
import random
import re
import secrets
import shlex
import shutil
import signal
import string
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from tools import PROBES, StripeJsonHandler, stop, stripe_signature, wait_line

# Where Stripe is told our endpoints live: only its path is used (the stand-in delivers to
# the instances round-robin, as a load balancer in front of them would).
PUBLIC_BASE = "http://127.0.0.1:9"
OUR_PREFIX = PUBLIC_BASE + "/webhooks/stripe/"
EVENT_TYPES = ["invoice.paid", "invoice.payment_failed", "checkout.session.completed",
               "customer.subscription.updated", "payment_intent.succeeded"]
SCOPES = ["tenants:write", "keys:read", "stripe:call", "events:read", "events:write",
          "ops:read"]
ALNUM = string.ascii_letters + string.digits


def log(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------------------------------
# The Stripe stand-in


def stripe_error(kind, message, code=None, param=None):
    error = {"type": kind, "message": message}
    if code:
        error["code"] = code
    if param:
        error["param"] = param
    return {"error": error}


class Account:
    """One tenant's Stripe account: its webhook endpoints and its event log."""

    def __init__(self, tenant):
        self.tenant = tenant
        self.endpoints = {}  # we_… -> endpoint (with its secret)
        self.events = []  # creation order; Stripe lists newest first


class StripeStandin(ThreadingHTTPServer):
    """Stripe as far as the service uses it, with state: keys it issued (anything else is
    401), the five permission probes (404 resource_missing: granted), webhook endpoints
    (create with idempotency, retrieve, list, delete), the event log (`GET /v1/events`),
    customers for proxied calls; and deliveries of signed webhooks to the instances
    round-robin with Stripe-style retries and redeliveries. During a burst most requests
    are answered 429 or 500 before anything is done."""

    daemon_threads = True

    def __init__(self, instance_bases, rng):
        super().__init__(("127.0.0.1", 0), StandinHandler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.lock = threading.Lock()
        self.accounts = {}  # tenant -> Account
        self.keys = {}  # api key -> tenant
        self.idempotent = {}  # (key, Idempotency-Key) -> (status, body)
        self.burst = (0.0, 0)  # (until, status)
        self.instance_bases = instance_bases  # callable: the live instances' base URLs
        self.rng = rng
        self.counts = collections.Counter()
        self.created_at = {}  # we_… -> monotonic time of its creation (diagnostics)
        self.deleted_at = {}  # we_… -> monotonic time of its deletion (diagnostics)
        self.deliveries = []  # heap-less list of (due, event, attempt); guarded by lock
        self.delivering = threading.Event()
        self.turn = 0
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def handle_error(self, request, client_address):
        # A caller killed mid-request (an instance under kill -9) resets its connection.
        with self.lock:
            self.counts["connections reset by a caller"] += 1

    def stop(self):
        self.delivering.clear()
        self.shutdown()
        self.server_close()

    def issue_key(self, tenant):
        key = "rk_test_51" + "".join(secrets.choice(ALNUM) for _ in range(40))
        with self.lock:
            self.keys[key] = tenant
            self.accounts.setdefault(tenant, Account(tenant))
        return key

    def start_burst(self, seconds, status):
        with self.lock:
            self.burst = (time.monotonic() + seconds, status)

    # --- events

    def create_event(self, tenant, missed):
        """An event on the tenant's account; delivered unless `missed` (then only recovery
        finds it)."""
        now = int(time.time())
        event = {
            "id": "evt_" + "".join(secrets.choice(ALNUM) for _ in range(24)),
            "object": "event", "api_version": "2023-08-16", "created": now,
            "livemode": False, "pending_webhooks": 1, "type": self.rng.choice(EVENT_TYPES),
            "request": {"id": None, "idempotency_key": None},
            "data": {"object": {"id": "in_" + secrets.token_hex(8), "object": "invoice"}},
        }
        with self.lock:
            self.accounts[tenant].events.append(event)
            self.counts["events"] += 1
            if missed:
                self.counts["events never delivered"] += 1
            else:
                self.deliveries.append((time.monotonic(), tenant, event, 0))
        return event

    def deliver_loop(self):
        """Sends due deliveries; a failed one is retried (0.5, 1, 2, 4, 8 s later), then
        given up (recovery must find it); a delivered one is sometimes delivered again."""
        while self.delivering.is_set():
            now = time.monotonic()
            with self.lock:
                due = [d for d in self.deliveries if d[0] <= now]
                self.deliveries = [d for d in self.deliveries if d[0] > now]
            for _, tenant, event, attempt in due:
                self.deliver(tenant, event, attempt)
            time.sleep(0.05)

    def deliver(self, tenant, event, attempt):
        with self.lock:
            endpoints = [dict(e) for e in self.accounts[tenant].endpoints.values()
                         if e["url"].startswith(OUR_PREFIX)]
        bases = self.instance_bases()
        if not endpoints or not bases:
            ok = False
        else:
            ok = True
            body = json.dumps(event).encode()
            for endpoint in endpoints:
                self.turn += 1
                base = bases[self.turn % len(bases)]
                now = int(time.time())
                signature = stripe_signature(endpoint["secret"], now, body)
                request = urllib.request.Request(
                    base + endpoint["url"][len(PUBLIC_BASE):], data=body, method="POST",
                    headers={"Content-Type": "application/json; charset=utf-8",
                             "Stripe-Signature": f"t={now},v1={signature}",
                             "User-Agent": "Stripe/1.0 (+https://stripe.com/docs/webhooks)"})
                try:
                    with urllib.request.urlopen(request, timeout=10) as answer:
                        status = answer.status
                except urllib.error.HTTPError as e:
                    status = e.code
                except OSError:
                    status = 0
                with self.lock:
                    self.counts[f"delivery answered {status or 'no answer'}"] += 1
                # An orphaned endpoint (a connection we no longer hold) answers 404: not
                # this event's delivery.
                if status // 100 != 2 and not (len(endpoints) > 1 and status == 404):
                    ok = False
        with self.lock:
            if ok:
                self.counts["events delivered"] += 1
                if attempt == 0 and self.rng.random() < 0.1:
                    self.counts["redeliveries of delivered events"] += 1
                    self.deliveries.append((time.monotonic() + self.rng.uniform(0.5, 3),
                                            tenant, event, -1))
            elif attempt >= 0 and attempt < 5:
                self.deliveries.append((time.monotonic() + 0.5 * 2 ** attempt, tenant,
                                        event, attempt + 1))
            elif attempt >= 0:
                self.counts["events given up after retries"] += 1

    def pending_deliveries(self):
        with self.lock:
            return len(self.deliveries)


class StandinHandler(StripeJsonHandler):

    def handle_any(self):
        s = self.server
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length).decode("utf-8", "replace")
        split = urlsplit(self.path)
        path = split.path
        params = parse_qs(split.query) if self.command == "GET" else parse_qs(raw)
        key = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
        with s.lock:
            until, burst_status = s.burst
            bursting = time.monotonic() < until and s.rng.random() < 0.6
            tenant = s.keys.get(key)
            s.counts["stripe requests"] += 1
            if bursting:
                s.counts[f"stripe answered {burst_status} (burst)"] += 1
        if bursting:
            if burst_status == 429:
                return self.send(429, stripe_error(
                    "invalid_request_error", "Too many requests hit the API too quickly.",
                    "rate_limit"))
            return self.send(500, stripe_error("api_error", "chaos burst"))
        if tenant is None:
            return self.send(401, stripe_error(
                "invalid_request_error", f"Invalid API Key provided: {key[:8]}****{key[-4:]}"))
        probe = next((p for p in PROBES if self.command == "POST" and p[1].match(path)), None)
        if probe is not None:
            return self.send(404, stripe_error(
                "invalid_request_error", f"No such {probe[2]}: '{probe[1].match(path)[1]}'",
                "resource_missing", "id"))
        if path == "/v1/webhook_endpoints":
            return self.endpoints(tenant, key, params)
        found = re.fullmatch(r"/v1/webhook_endpoints/(we_[A-Za-z0-9]+)", path)
        if found and self.command in ("GET", "DELETE"):
            return self.endpoint(tenant, found[1])
        if path == "/v1/events" and self.command == "GET":
            return self.events(tenant, params)
        found = re.fullmatch(r"/v1/customers/(cus_[A-Za-z0-9_]+)", path)
        if found and self.command == "GET":
            return self.send(200, {"id": found[1], "object": "customer", "livemode": False,
                                   "email": None, "metadata": {}})
        return self.send(404, stripe_error(
            "invalid_request_error", f"Unrecognized request URL ({self.command}: {path})."))

    def endpoints(self, tenant, key, params):
        s = self.server
        account = s.accounts[tenant]
        if self.command == "GET":
            with s.lock:
                data = [{k: v for k, v in e.items() if k != "secret"}
                        for e in account.endpoints.values()]
            return self.send(200, {"object": "list", "data": data, "has_more": False,
                                   "url": "/v1/webhook_endpoints"})
        if self.command != "POST":
            return self.send(405, stripe_error("invalid_request_error", "method"))
        idempotency = self.headers.get("Idempotency-Key")
        with s.lock:
            replay = s.idempotent.get((key, idempotency)) if idempotency else None
            if replay is None:
                endpoint = {
                    "id": "we_" + "".join(secrets.choice(ALNUM) for _ in range(24)),
                    "object": "webhook_endpoint", "url": (params.get("url") or [""])[0],
                    "status": "enabled", "enabled_events": params.get("enabled_events[]", []),
                    "livemode": False, "metadata": {}, "created": int(time.time()),
                    "secret": "whsec_" + "".join(secrets.choice(ALNUM) for _ in range(32)),
                }
                account.endpoints[endpoint["id"]] = endpoint
                s.created_at[endpoint["id"]] = time.monotonic()
                s.counts["endpoints created"] += 1
                replay = (200, dict(endpoint))
                if idempotency:
                    s.idempotent[(key, idempotency)] = replay
        return self.send(*replay)

    def endpoint(self, tenant, endpoint_id):
        s = self.server
        with s.lock:
            stored = s.accounts[tenant].endpoints.get(endpoint_id)
            if stored is not None and self.command == "DELETE":
                del s.accounts[tenant].endpoints[endpoint_id]
                s.deleted_at[endpoint_id] = time.monotonic()
                s.counts["endpoints deleted"] += 1
        if stored is None:
            return self.send(404, stripe_error(
                "invalid_request_error", f"No such webhook endpoint: '{endpoint_id}'",
                "resource_missing", "id"))
        if self.command == "DELETE":
            return self.send(200, {"id": endpoint_id, "object": "webhook_endpoint",
                                   "deleted": True})
        return self.send(200, {k: v for k, v in stored.items() if k != "secret"})

    def events(self, tenant, params):
        s = self.server
        gte = int((params.get("created[gte]") or ["0"])[0])
        types = set(params.get("types[]", []))
        limit = max(1, min(100, int((params.get("limit") or ["10"])[0])))
        after = (params.get("starting_after") or [None])[0]
        with s.lock:
            listed = [e for e in reversed(s.accounts[tenant].events)
                      if e["created"] >= gte and (not types or e["type"] in types)]
            s.counts["event pages listed"] += 1
        if after is not None:
            ids = [e["id"] for e in listed]
            if after not in ids:
                return self.send(400, stripe_error(
                    "invalid_request_error", f"No such event: '{after}'", "resource_missing",
                    "starting_after"))
            listed = listed[ids.index(after) + 1:]
        return self.send(200, {"object": "list", "url": "/v1/events",
                               "data": listed[:limit], "has_more": len(listed) > limit})

    do_GET = do_POST = do_DELETE = handle_any


# ---------------------------------------------------------------------------------------
# The announcement receiver (Atlas)


class Receiver(ThreadingHTTPServer):
    """Atlas's end of the announcements: verifies each Standard Webhooks signature, records
    what arrived (per tenant, in order of arrival), answers 2xx, or 503 now and then so that
    retries happen."""

    daemon_threads = True

    def __init__(self, secret, rng):
        super().__init__(("127.0.0.1", 0), ReceiverHandler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}/atlas/announcements"
        self.key = base64.b64decode(secret.removeprefix("whsec_"))
        self.lock = threading.Lock()
        self.received = []  # (webhook-id, tenant, type)
        self.bad_signatures = 0
        self.refused = 0
        self.rng = rng
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def handle_error(self, request, client_address):
        # A deliverer killed mid-request resets its connection: its retry is what counts.
        pass

    def stop(self):
        self.shutdown()
        self.server_close()


class ReceiverHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *_):
        pass

    def answer(self, status):
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_POST(self):
        r = self.server
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        msg_id = self.headers.get("webhook-id", "")
        stamp = self.headers.get("webhook-timestamp", "")
        content = f"{msg_id}.{stamp}.".encode() + body
        expected = base64.b64encode(hmac.new(r.key, content, hashlib.sha256).digest()).decode()
        offered = [s.split(",", 1)[1] for s in self.headers.get("webhook-signature", "").split()
                   if s.startswith("v1,")]
        if not any(hmac.compare_digest(expected, s) for s in offered):
            with r.lock:
                r.bad_signatures += 1
            return self.answer(400)
        with r.lock:
            if r.rng.random() < 0.05:
                r.refused += 1
                refuse = True
            else:
                refuse = False
                announcement = json.loads(body)
                r.received.append((msg_id, announcement["data"].get("tenant_id"),
                                   announcement["type"]))
        self.answer(503 if refuse else 204)


# ---------------------------------------------------------------------------------------
# The instances


class Instance:
    """One `atlas-stripe serve`, on a port of its own choosing (read from its log)."""

    def __init__(self, index, args, env_of):
        self.index = index
        self.args = args
        self.env_of = env_of
        self.proc = None
        self.base = None
        self.starts = 0
        self.lock = threading.Lock()
        self.restarting = threading.Lock()

    def start(self):
        """Starts it and waits until it serves (retrying while the database is down)."""
        for _ in range(30):
            self.starts += 1
            path = os.path.join(self.args.artifacts, f"instance{self.index}.{self.starts}.log")
            with open(path, "w") as out:
                proc = subprocess.Popen([self.args.bin, "serve"], stdout=out,
                                        stderr=subprocess.STDOUT, env=self.env_of())
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and proc.poll() is None:
                with open(path, encoding="utf-8", errors="replace") as f:
                    line = next((l for l in f if '"message":"serving"' in l), None)
                if line:
                    with self.lock:
                        self.proc, self.base = proc, f"http://127.0.0.1:{json.loads(line)['port']}"
                    return
                time.sleep(0.05)
            stop(proc)
            time.sleep(0.5)
        raise SystemExit(f"instance {self.index} did not start; see {path}")

    def restart(self, kill):
        """kill -9 (a crash) or SIGTERM (a deployment), then a start at once. One at a time:
        the fault schedule, the rewrap's deployment and the supervisor may meet here."""
        with self.restarting:
            self.terminate(kill)
            self.start()

    def terminate(self, kill=False):
        with self.lock:
            proc, self.proc, self.base = self.proc, None, None
        if proc is not None and kill:
            proc.kill()
            proc.wait()
        elif proc is not None:
            stop(proc)

    def exited(self):
        """Whether the process ended by itself (not stopped from here)."""
        with self.lock:
            return self.proc is not None and self.proc.poll() is not None

    def current(self):
        with self.lock:
            return self.base


# ---------------------------------------------------------------------------------------
# The run


class Chaos:
    def __init__(self, args):
        self.args = args
        self.seed = args.seed
        self.rng = random.Random(args.seed)
        self.quick = args.quick
        self.load_seconds = args.duration
        self.tenants = [f"ten_chaos{i:03d}" for i in range(args.tenants)]
        # A quarter of the tenants carry events and are never disconnected (replaced, often
        # racing): their feed is compared with their account's event log.
        self.event_tenants = self.tenants[::4]
        self.churn_tenants = [t for t in self.tenants if t not in self.event_tenants]
        self.issued = collections.defaultdict(set)  # tenant -> keys sent to connect
        self.statuses = []  # (monotonic, operation, status, code)
        self.status_lock = threading.Lock()
        self.unanswered = collections.defaultdict(list)  # tenant -> (monotonic, op, method)
        self.ops = collections.Counter()
        self.faults = collections.Counter()
        self.pg_down = []  # (from, to) monotonic
        self.running = threading.Event()
        self.rewrap_status = None
        self.rewrap_runs = 0
        self.old_key_id, self.new_key_id = "chaos1", "chaos2"
        self.rewrap_proc = None
        self.harness_errors = []
        self.fault_times = []
        self.load_started = time.monotonic()
        self.finished = threading.Event()

    # --- set-up

    def base_env(self):
        env = dict(os.environ)
        env.update({
            "ATLAS_STRIPE__DATABASE__URL": self.args.database_url,
            "ATLAS_STRIPE__SERVER__BIND": "127.0.0.1:0",
            "ATLAS_STRIPE__DEV__GENERATE_SECRETS": "false",
            "ATLAS_STRIPE__CRYPTO__FINGERPRINT_KEY": base64.b64encode(os.urandom(32)).decode(),
            "ATLAS_STRIPE__AUTH__TENANT_TOKEN_SECRET": self.tenant_secret,
            "ATLAS_STRIPE__WEBHOOKS__PUBLIC_BASE_URL": PUBLIC_BASE,
            "ATLAS_STRIPE__LIMITS__CONNECT_ATTEMPTS_PER_MINUTE": "1000000",
            "ATLAS_STRIPE__LIMITS__VERIFY_ATTEMPTS_PER_MINUTE": "1000000",
            # A deployment's SIGTERM drains in-flight requests this long (short: the rolling
            # restart of three instances stays within the run).
            "ATLAS_STRIPE__SERVER__SHUTDOWN_GRACE_MS": "3000",
            "ATLAS_STRIPE__LOG__FORMAT": "json",
            "ATLAS_STRIPE__LOG__FILTER": "warn,atlas_stripe::cli=info",
        })
        return env

    def env(self):
        with self.config_lock:
            return dict(self.config)

    def cli(self, *argv):
        with open(os.path.join(self.args.artifacts, "cli.log"), "a") as err:
            return subprocess.run([self.args.bin, *argv], env=self.env(), stderr=err,
                                  stdout=subprocess.PIPE, check=True, text=True).stdout.strip()

    def setup(self):
        os.makedirs(self.args.artifacts, exist_ok=True)
        self.tenant_secret = base64.b64encode(os.urandom(48)).decode()
        self.config_lock = threading.Lock()
        self.config = self.base_env()
        self.old_entry = subprocess.run([self.args.bin, "keys", "generate", "--id",
                                         self.old_key_id], env=self.config, check=True,
                                        stdout=subprocess.PIPE, text=True).stdout.strip()
        notification_secret = "whsec_" + base64.b64encode(os.urandom(32)).decode()
        self.receiver = Receiver(notification_secret, random.Random(self.seed + 1))
        self.stripe = StripeStandin(self.live_bases, random.Random(self.seed + 2))
        self.config.update({
            "ATLAS_STRIPE__CRYPTO__MASTER_KEYS": self.old_entry,
            "ATLAS_STRIPE__CRYPTO__ACTIVE_KEY_ID": self.old_key_id,
            "ATLAS_STRIPE__STRIPE__API_BASE": self.stripe.url,
            "ATLAS_STRIPE__NOTIFICATIONS__URL": self.receiver.url,
            "ATLAS_STRIPE__NOTIFICATIONS__SECRET": notification_secret,
            # Twenty attempts a second apart: the receiver's occasional 503 never exhausts it.
            "ATLAS_STRIPE__NOTIFICATIONS__RETRY_SCHEDULE": ",".join(["0s"] + ["1s"] * 19),
            # Quick: recovery only on demand at the end; else every 10 s (the least allowed),
            # under the kills.
            "ATLAS_STRIPE__WEBHOOKS__RECOVERY_INTERVAL_SECS": "900" if self.quick else "10",
        })
        self.cli("migrate")
        self.token = self.cli("service-token", "create", "--name", "chaos",
                              *[a for s in SCOPES for a in ("--scope", s)])
        self.instances = [Instance(i, self.args, self.env) for i in range(3)]
        for instance in self.instances:
            instance.start()
        threading.Thread(target=self.supervise, daemon=True).start()
        self.stripe.delivering.set()
        threading.Thread(target=self.stripe.deliver_loop, daemon=True).start()

    def live_bases(self):
        return [b for b in (i.current() for i in self.instances) if b]

    def tenant_token(self, tenant):
        def b64(data):
            return base64.urlsafe_b64encode(data).rstrip(b"=")
        head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        claims = b64(json.dumps({"tenant_id": tenant, "exp": int(time.time()) + 1800}).encode())
        signature = hmac.new(self.tenant_secret.encode(), head + b"." + claims,
                             hashlib.sha256).digest()
        return (head + b"." + claims + b"." + b64(signature)).decode()

    # --- requests

    def call(self, operation, method, path, token, body=None, base=None):
        """One request through a live instance (a random one: the load balancer). Records
        (status, code); a refused connection (an instance being killed) records status 0.
        Returns (status, parsed body or None)."""
        bases = self.live_bases()
        base = base or (self.rng.choice(bases) if bases else None)
        if base is None:
            time.sleep(0.1)
            return 0, None
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(base + path, data=data, method=method,
                                         headers={"Authorization": f"Bearer {token}"})
        if data is not None:
            request.add_header("Content-Type", "application/json")
        cleanup = None
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                status, text = answer.status, answer.read()
                cleanup = answer.headers.get("atlas-stripe-cleanup")
        except urllib.error.HTTPError as e:
            status, text = e.code, e.read()
        except OSError:
            status, text = 0, b""
        try:
            parsed = json.loads(text) if text else None
        except ValueError:
            parsed = None
        code = None
        if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
            code = parsed["error"].get("code") or parsed["error"].get("type")
            if parsed["error"].get("message") == "chaos burst":
                code = "stripe's own 500 (burst)"
        if cleanup is not None:
            # What a disconnect did to our endpoint on Stripe (deleted, failed, …).
            code = f"cleanup {cleanup}"
        with self.status_lock:
            self.statuses.append((time.monotonic(), operation, status, code))
            self.ops[operation] += 1
            if status == 0:
                tenant = re.search(r"/tenants/([^/]+)/", path)
                self.unanswered[tenant.group(1) if tenant else "-"].append(
                    (time.monotonic(), operation, method))
        return status, parsed

    def connect(self, tenant, base=None):
        key = self.stripe.issue_key(tenant)
        with self.status_lock:
            self.issued[tenant].add(key)
        return self.call("connect", "POST", f"/v1/tenants/{tenant}/stripe/connection",
                         self.tenant_token(tenant), {"api_key": key}, base)[0]

    def until_done(self, operation, attempt, done, seconds=60):
        """Repeats `attempt` (a caller retrying) until its status is in `done`."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            status = attempt()
            if status in done:
                return status
            time.sleep(0.2)
        raise SystemExit(f"{operation}: no success within {seconds} s")

    def seed_tenants(self):
        log(f"set-up: {len(self.tenants)} tenants, every one connected")
        def one(tenant):
            self.until_done("tenant", lambda: self.call(
                "set-up", "PUT", f"/internal/v1/tenants/{tenant}", self.token,
                {"mode": "test"})[0], (200, 201))
            self.until_done("connect", lambda: self.connect(tenant), (200, 201))
        threads = []
        for chunk in range(8):
            t = threading.Thread(target=lambda c=chunk: [one(x) for x in self.tenants[c::8]])
            t.start()
            threads.append(t)
        for t in threads:
            t.join()

    # --- load

    def worker(self, rng):
        while self.running.is_set():
            tenant = rng.choice(self.tenants)
            churn = tenant in self.churn_tenants
            roll = rng.random()
            if roll < 0.30:
                self.call("key fetch", "GET", f"/internal/v1/tenants/{tenant}/stripe/key",
                          self.token)
            elif roll < 0.50:
                self.call("proxied call", "GET",
                          f"/internal/v1/tenants/{tenant}/stripe/v1/customers/cus_{rng.randrange(10**6)}",
                          self.token)
            elif roll < 0.58:
                self.call("summary", "GET", f"/v1/tenants/{tenant}/stripe/connection",
                          self.tenant_token(tenant))
            elif roll < 0.70:
                self.connect(tenant)
            elif roll < 0.76:
                # Two replacements of one tenant at once, through two instances.
                bases = self.live_bases()
                racers = [threading.Thread(target=self.connect, args=(tenant, b))
                          for b in rng.sample(bases, min(2, len(bases)))]
                for r in racers:
                    r.start()
                for r in racers:
                    r.join()
                with self.status_lock:
                    self.ops["racing replacements"] += 1
            elif roll < 0.86 and churn:
                self.call("disconnect", "DELETE", f"/v1/tenants/{tenant}/stripe/connection",
                          self.tenant_token(tenant))
            else:
                self.call("event feed", "GET",
                          f"/internal/v1/tenants/{tenant}/stripe/events?limit=50", self.token)

    def event_source(self, rng):
        """Events on the event tenants' accounts, ~8/s; 15% are never delivered."""
        while self.running.is_set():
            self.stripe.create_event(rng.choice(self.event_tenants), rng.random() < 0.15)
            time.sleep(rng.uniform(0.05, 0.2))

    # --- faults

    def schedule(self):
        """The fault schedule, from the seed alone: (seconds into the load, fault, arg)."""
        rng = random.Random(self.seed)
        every = 4.0 if self.quick else 5.0
        plan = []
        t = 3.0
        # No kill in the last seconds: what they hold (leases) must expire before the check.
        last_kill = self.load_seconds - (10 if self.quick else 20)
        while t < last_kill:
            plan.append((round(t, 1), "kill -9 instance", rng.randrange(3)))
            t += rng.uniform(every * 0.6, every * 1.4)
        plan.append((round(self.load_seconds * 0.35, 1), "restart PostgreSQL (immediate)", None))
        plan.append((round(self.load_seconds * 0.55, 1), "master-key rewrap", None))
        for _ in range(2 if self.quick else 10):
            plan.append((round(rng.uniform(2, self.load_seconds - 5), 1), "Stripe burst",
                         rng.choice([429, 500])))
        return sorted(plan, key=lambda p: p[0])

    def faults_loop(self, plan, started):
        for at, fault, arg in plan:
            while self.running.is_set() and time.monotonic() - started < at:
                time.sleep(0.05)
            if not self.running.is_set():
                return
            self.faults[fault] += 1
            self.fault_times.append((time.monotonic(), fault))
            try:
                self.inject(fault, arg)
            except Exception as e:  # noqa: BLE001 -- a fault that could not be injected fails the run
                self.harness_errors.append(f"{fault}: {e}")
                log(f"could not inject {fault}: {e}")

    def inject(self, fault, arg):
        if fault == "kill -9 instance":
            self.instances[arg].restart(kill=True)
        elif fault == "restart PostgreSQL (immediate)":
            self.restart_postgres()
        elif fault == "master-key rewrap":
            threading.Thread(target=self.rewrap, daemon=True).start()
        elif fault == "Stripe burst":
            self.stripe.start_burst(1.5, arg)

    def restart_postgres(self):
        # As scripts/lib/pg.sh started it: as `nobody` when run as root.
        as_pg = []
        if os.getuid() == 0:
            import pwd
            nobody = pwd.getpwnam("nobody")
            as_pg = ["setpriv", "--reuid=nobody", f"--regid={nobody.pw_gid}", "--clear-groups",
                     "--"]
        pg_ctl = [*as_pg, os.path.join(self.args.pg_bin, "pg_ctl"), "-D", self.args.pg_data]
        # Started again with the options it was started with (port, socket directory, …).
        with open(os.path.join(self.args.pg_data, "postmaster.opts")) as f:
            argv = shlex.split(f.read())[1:]
        options = [a for i, a in enumerate(argv) if a != "-D" and (i == 0 or argv[i - 1] != "-D")]
        down = time.monotonic()
        subprocess.run([*pg_ctl, "-m", "immediate", "stop"], check=True,
                       stdout=subprocess.DEVNULL)
        # A moment down, as a failover takes.
        time.sleep(2)
        subprocess.run([*pg_ctl, "-l", self.args.pg_log, "-o", shlex.join(options), "-w", "-t",
                        "60", "start"],
                       check=True, stdout=subprocess.DEVNULL)
        self.pg_down.append((down, time.monotonic()))
        log(f"PostgreSQL restarted (down {time.monotonic() - down:.1f} s)")

    def rewrap(self):
        """A new master key rolled out as the README says, in two deployments (the
        instances restarted one by one): first known beside the old one, then made active;
        then `keys rewrap`, killed -9 once in its first moments and run again until it
        completes."""
        entry = self.cli("keys", "generate", "--id", self.new_key_id)
        with self.config_lock:
            self.config["ATLAS_STRIPE__CRYPTO__MASTER_KEYS"] = f"{self.old_entry},{entry}"
        for instance in self.instances:
            instance.restart(kill=False)
        with self.config_lock:
            self.config["ATLAS_STRIPE__CRYPTO__ACTIVE_KEY_ID"] = self.new_key_id
        for instance in self.instances:
            instance.restart(kill=False)
        log("rewrap: every instance restarted with the new key, then with it active; keys rewrap")
        with open(os.path.join(self.args.artifacts, "rewrap.log"), "a") as out:
            for attempt in range(1, 30):
                self.rewrap_runs = attempt
                proc = subprocess.Popen([self.args.bin, "keys", "rewrap", "--batch", "2"],
                                        env=self.env(), stdout=out, stderr=subprocess.STDOUT)
                self.rewrap_proc = proc
                if attempt == 1:
                    time.sleep(0.15)
                    if proc.poll() is None:
                        proc.kill()
                        self.faults["kill -9 of the rewrap"] += 1
                proc.wait()
                self.rewrap_status = proc.returncode
                if proc.returncode == 0:
                    log(f"rewrap: completed (run {attempt})")
                    return
                time.sleep(1)

    # --- the run

    def run(self):
        plan = self.schedule()
        print(f"chaos: seed {self.seed}; {len(self.tenants)} tenants "
              f"({len(self.event_tenants)} with events); load {self.load_seconds:.0f} s")
        print("fault schedule (seconds into the load):")
        for at, fault, arg in plan:
            print(f"  {at:6.1f}  {fault}{'' if arg is None else f' {arg}'}")
        sys.stdout.flush()
        self.setup()
        self.seed_tenants()
        log("load and faults")
        self.running.set()
        started = self.load_started = time.monotonic()
        threads = [threading.Thread(target=self.worker, args=(random.Random(self.seed * 100 + i),))
                   for i in range(6)]
        threads.append(threading.Thread(target=self.event_source,
                                        args=(random.Random(self.seed * 100 + 99),)))
        faults = threading.Thread(target=self.faults_loop, args=(plan, started))
        for t in threads + [faults]:
            t.start()
        while time.monotonic() - started < self.load_seconds:
            time.sleep(0.2)
        self.running.clear()
        for t in threads + [faults]:
            t.join()
        log("load stopped; waiting for the rewrap, the deliveries, recovery, announcements")
        self.settle()
        return self.check()

    def settle(self):
        started = time.monotonic()
        limit = 150 if not self.quick else 90
        deadline = time.monotonic() + limit
        while self.rewrap_status != 0 and time.monotonic() < deadline and self.rewrap_runs < 29:
            time.sleep(0.5)
        while self.stripe.pending_deliveries() and time.monotonic() < deadline:
            time.sleep(0.2)
        # Recovery asked for on every event tenant (a caller retrying until it is accepted).
        for tenant in self.event_tenants:
            while time.monotonic() < deadline and self.call(
                    "recover", "POST", f"/internal/v1/tenants/{tenant}/stripe/events/recover",
                    self.token, {})[0] != 202:
                time.sleep(0.2)
        while time.monotonic() < deadline:
            try:
                _, _, wrong, orphaned = self.endpoint_mismatches()
                if not (self.missing_events() or self.undelivered_announcements() or wrong
                        or orphaned):
                    break
            except subprocess.CalledProcessError:
                pass
            time.sleep(1)
        log(f"settled after {time.monotonic() - started:.0f} s")

    # --- the database

    def sql(self, query):
        psql = shutil.which("psql") or os.path.join(self.args.pg_bin, "psql")
        out = subprocess.run([psql, "-X", "-q", "-A", "-t",
                              "-F", "\t", "-v", "ON_ERROR_STOP=1", self.args.database_url,
                              "-c", query], check=True, stdout=subprocess.PIPE, text=True).stdout
        return [line.split("\t") for line in out.splitlines() if line]

    def stored_events(self):
        return self.sql("SELECT tenant_id, event_id, count(*) FROM webhook_events "
                        "GROUP BY tenant_id, event_id")

    def sent_events(self):
        with self.stripe.lock:
            return {t: {e["id"] for e in self.stripe.accounts[t].events}
                    for t in self.event_tenants}

    def missing_events(self):
        stored = collections.defaultdict(set)
        for tenant, event_id, _ in self.stored_events():
            stored[tenant].add(event_id)
        return sum(len(ids - stored[t]) for t, ids in self.sent_events().items())

    def undelivered_announcements(self):
        [[count]] = self.sql("SELECT count(*) FROM notifications WHERE status <> 'delivered'")
        with self.receiver.lock:
            received = {m for m, _, _ in self.receiver.received}
        [[total]] = self.sql("SELECT count(*) FROM notifications")
        return int(count) + max(0, int(total) - len(received))

    def endpoint_mismatches(self):
        """(connections, our endpoints per tenant, connected tenants whose endpoints on
        Stripe are not exactly theirs, disconnected tenants with one of ours left)."""
        rows = self.sql("SELECT tenant_id, connection_id, coalesce(webhook_endpoint_id, '') "
                        "FROM stripe_connections")
        connected = {t: (c, w) for t, c, w in rows}
        with self.stripe.lock:
            ours = {t: [(e["id"], e["url"]) for e in a.endpoints.values()
                        if e["url"].startswith(OUR_PREFIX)]
                    for t, a in self.stripe.accounts.items()}
        orphaned, wrong = [], []
        for tenant in self.tenants:
            endpoints = ours.get(tenant, [])
            if tenant in connected:
                connection_id, endpoint_id = connected[tenant]
                if endpoints != [(endpoint_id, OUR_PREFIX + connection_id)]:
                    wrong.append(tenant)
            elif endpoints:
                orphaned.append(tenant)
        return connected, ours, wrong, orphaned

    def explain_missing(self, sent, stored):
        """For a failed events line: each missing event's age and the state of its tenant's
        recovery cursor (who holds it, until when, what it has passed)."""
        cursors = {row[0]: row[1:] for row in self.sql(
            "SELECT s.tenant_id, r.connection_id, r.event_recovery, r.webhook_status, "
            "extract(epoch FROM r.recovered_through)::bigint, "
            "extract(epoch FROM r.due_at)::bigint, "
            "coalesce(extract(epoch FROM r.run_since)::bigint::text, '-'), "
            "coalesce(r.lease_owner, '-'), "
            "coalesce(extract(epoch FROM r.lease_until)::bigint::text, '-'), "
            "coalesce(extract(epoch FROM r.last_run_at)::bigint::text, '-') "
            "FROM stripe_connections s LEFT JOIN recovery_cursors r "
            "ON r.connection_id = s.connection_id")}
        now = int(time.time())
        print(f"        now {now}, load started {int(time.time() - (time.monotonic() - self.load_started))}")
        with self.stripe.lock:
            created = {e["id"]: e["created"] for t in sent
                       for e in self.stripe.accounts[t].events}
        for tenant, ids in sorted(sent.items()):
            lost = sorted(ids - stored[tenant], key=lambda e: created[e])
            if lost:
                print(f"        {tenant}: {len(lost)} missing, created "
                      + ", ".join(str(created[e]) for e in lost[:6])
                      + f"; cursor (connection, recovery, endpoint, through, due, run since, "
                        f"lease owner, lease until, last run): {cursors.get(tenant, 'none')}")

    # --- the invariants

    def check(self):
        results = []

        def line(ok, text):
            results.append(ok)
            print(f"  {'PASS' if ok else 'FAIL'}  {text}")

        print()
        print(f"operations: {sum(self.ops.values())} requests: "
              + ", ".join(f"{k} {v}" for k, v in sorted(self.ops.items())))
        print(f"faults: " + ", ".join(f"{k} x{v}" for k, v in sorted(self.faults.items())))
        print("stripe stand-in: " + ", ".join(f"{k} {v}" for k, v in sorted(self.stripe.counts.items())))
        print("invariants:")

        # Events: every event of an event tenant's account stored once, under that tenant.
        sent = self.sent_events()
        stored = collections.defaultdict(set)
        doubled = foreign = 0
        for tenant, event_id, count in self.stored_events():
            stored[tenant].add(event_id)
            doubled += int(count) > 1
            foreign += tenant not in sent or event_id not in sent[tenant]
        total = sum(len(ids) for ids in sent.values())
        missing = sum(len(ids - stored[t]) for t, ids in sent.items())
        never = self.stripe.counts["events never delivered"]
        if missing:
            self.explain_missing(sent, stored)
        line(missing == 0 and doubled == 0 and foreign == 0,
             f"events: {total} sent ({never} never delivered), {total - missing} stored, "
             f"{missing} missing, {doubled} stored twice, {foreign} not sent to that tenant")

        # Endpoints: exactly the connected tenants' endpoints carry our URL.
        connected, ours, wrong, orphaned = self.endpoint_mismatches()
        for tenant in (wrong + orphaned)[:5]:
            stored = connected.get(tenant)
            found = "; ".join(
                f"{e} for {u.rsplit('/', 1)[1]} created at "
                f"{self.stripe.created_at.get(e, 0) - self.load_started:.1f} s"
                for e, u in ours.get(tenant, []))
            print(f"        {tenant}: stored {stored}; on Stripe: {found or 'none'}")
            if stored:
                at = lambda times: (f"{times[stored[1]] - self.load_started:.1f} s"
                                    if stored[1] in times else "-")
                print(f"          stored endpoint created at {at(self.stripe.created_at)}, "
                      f"deleted at {at(self.stripe.deleted_at)}")
            lost = ", ".join(f"{op} {method} at {t - self.load_started:.1f} s"
                             for t, op, method in self.unanswered.get(tenant, []))
            print(f"          requests with no answer: {lost or 'none'}")
        kills = ", ".join(f"{at - self.load_started:.1f}" for at, _ in self.fault_times)
        if wrong or orphaned:
            print(f"        faults at (s): {kills}")
        line(not orphaned and not wrong,
             f"endpoints: {len(connected)} connected tenants, "
             f"{len(connected) - len(wrong)} with exactly their own endpoint; "
             f"{len(wrong)} with another set{_names(wrong)}; "
             f"{len(orphaned)} disconnected tenants with ours left{_names(orphaned)}")

        # Keys: every connection opens, and holds a key that tenant connected with.
        bad = []
        for tenant in sorted(connected):
            status, body = self.call("check", "GET", f"/internal/v1/tenants/{tenant}/stripe/key",
                                     self.token)
            if status != 200 or (body or {}).get("api_key") not in self.issued[tenant]:
                bad.append(f"{tenant}:{status}")
        line(not bad, f"keys: {len(connected) - len(bad)} of {len(connected)} connections "
                      f"open to a key their tenant sent{_names(bad)}")

        # Announcements: each recorded one received, in per-tenant order, none unknown.
        rows = self.sql("SELECT tenant_id, id, status FROM notifications ORDER BY tenant_id, seq")
        recorded = collections.defaultdict(list)
        statuses = collections.Counter()
        for tenant, msg_id, status in rows:
            recorded[tenant].append(msg_id)
            statuses[status] += 1
        with self.receiver.lock:
            received = list(self.receiver.received)
        first = collections.defaultdict(list)
        seen = set()
        for msg_id, tenant, _ in received:
            if msg_id not in seen:
                seen.add(msg_id)
                first[tenant].append(msg_id)
        out_of_order = [t for t in recorded if first.get(t, []) != recorded[t]]
        unknown = len(seen - {m for ids in recorded.values() for m in ids})
        line(not out_of_order and unknown == 0 and self.receiver.bad_signatures == 0,
             f"announcements: {len(rows)} recorded ({', '.join(f'{s} {n}' for s, n in sorted(statuses.items()))}), "
             f"{len(seen)} received ({len(received) - len(seen)} again, "
             f"{self.receiver.refused} refused 503 by us), {len(out_of_order)} tenants out of "
             f"order or with a gap{_names(out_of_order)}, {unknown} unknown, "
             f"{self.receiver.bad_signatures} bad signatures")

        # Rewrap: it completed, and every sealed secret is under the new key.
        rows = self.sql("SELECT master_key_id, count(*) FROM stripe_connections GROUP BY 1 "
                        "UNION ALL SELECT 'webhook:' || webhook_master_key_id, count(*) "
                        "FROM stripe_connections WHERE webhook_master_key_id IS NOT NULL GROUP BY 1")
        under = {k: int(n) for k, n in rows}
        old = sum(n for k, n in under.items() if k.removeprefix("webhook:") != self.new_key_id)
        line(self.rewrap_status == 0 and old == 0,
             f"rewrap: exit {self.rewrap_status} after {self.rewrap_runs} runs; "
             f"{sum(under.values()) - old} sealed secrets under {self.new_key_id}, {old} under another")

        # Statuses: no 500; a 5xx only as 503 service_unavailable while PostgreSQL was down
        # (and the pool reconnecting, 10 s), or as Stripe's own answer passed on.
        histogram = collections.Counter()
        unexplained = collections.Counter()
        for at, operation, status, code in self.statuses:
            histogram[(status, code)] += 1
            if status >= 500:
                during = any(a - 1 <= at <= b + 10 for a, b in self.pg_down)
                if status == 503 and code == "service_unavailable" and during:
                    continue
                if code in ("stripe_unavailable", "stripe's own 500 (burst)"):
                    continue
                unexplained[(operation, status, code)] += 1
        print("  statuses: " + ", ".join(
            f"{s or 'no answer'}{'' if c is None else ' ' + c} x{n}"
            for (s, c), n in sorted(histogram.items(), key=lambda x: (x[0][0], str(x[0][1])))))
        # Stripe's own 500, passed on by the proxy as the contract says, is not ours.
        five_hundreds = sum(n for (s, c), n in histogram.items()
                            if s == 500 and c != "stripe's own 500 (burst)")
        line(five_hundreds == 0 and not unexplained,
             f"statuses: {five_hundreds} answered 500; 5xx not explained by the PostgreSQL "
             f"restart or Stripe: {sum(unexplained.values())}"
             + "".join(f"; {op} {s} {c} x{n}" for (op, s, c), n in unexplained.items()))

        line(not self.harness_errors, "harness: every fault injected"
             + "".join(f"; {e}" for e in self.harness_errors))

        passed = sum(results)
        failed = len(results) - passed
        print(f"chaos (seed {self.seed}): {passed} passed, {failed} failed")
        return 0 if failed == 0 else 1

    def supervise(self):
        """An orchestrator's part: an instance that ended by itself is started again (and
        counted: none should)."""
        while not self.finished.is_set():
            for instance in self.instances:
                if instance.exited():
                    with self.status_lock:
                        self.faults["instance ended by itself (restarted)"] += 1
                    instance.restart(kill=True)
            time.sleep(0.5)

    def shutdown(self):
        self.running.clear()
        self.finished.set()
        if self.rewrap_proc is not None:
            stop(self.rewrap_proc)
        for instance in getattr(self, "instances", []):
            instance.terminate()
        for server in ("stripe", "receiver"):
            if hasattr(self, server):
                getattr(self, server).stop()


def _names(items, most=5):
    if not items:
        return ""
    shown = ", ".join(items[:most])
    return f" ({shown}{', …' if len(items) > most else ''})"


def main():
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bin", required=True)
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--pg-bin", required=True)
    parser.add_argument("--pg-data", required=True)
    parser.add_argument("--pg-log", required=True)
    parser.add_argument("--artifacts", default="artifacts/chaos")
    parser.add_argument("--quick", action="store_true", help="about 60 s in all")
    parser.add_argument("--duration", type=float, help="seconds of load (default 300; --quick 30)")
    parser.add_argument("--tenants", type=int, default=200)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    if args.seed is None:
        args.seed = secrets.randbelow(2**31)
    if args.duration is None:
        args.duration = 30 if args.quick else 300
    chaos = Chaos(args)
    try:
        return chaos.run()
    finally:
        chaos.shutdown()


if __name__ == "__main__":
    sys.exit(main())
