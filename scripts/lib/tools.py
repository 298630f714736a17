"""The logic of the bash scripts in scripts/, in one place (Python 3 standard library only;
Schemathesis, which `fuzz` runs, is pinned in scripts/lib/fuzz-requirements.txt). The bash
scripts build, install and start things; what they compute or decide is here.

    tools.py fuzz [options] NAME=DATABASE_URL…    scripts/fuzz: seeds, starts and fuzzes the
                                                  service on each backend (see fuzz_backend)
    tools.py wrk [options] -- WRK_ARGS…           one benchmark row: wrk, its figures, CPU time
    tools.py bench-summary key-fetch|proxy FILE   the ratios of the rows wrk wrote to FILE
    tools.py rewrap --secrets N -- COMMAND…       times COMMAND: secrets/s and peak RSS
    tools.py clean-run NAME -- COMMAND…           runs COMMAND; fails unless it exits 0 and
                                                  leaves no process or temporary file behind
"""

import argparse
import base64
import collections
import hashlib
import hmac
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


# ---------------------------------------------------------------------------------------
# The fake Stripe (scripts/fuzz)
#
# Answers the five permission probes and the webhook-endpoint calls the service sends, in
# Stripe's own shapes, deciding by the key's last four characters (as
# tests/e2e/fake-stripe.mjs does, so the fuzzer's connects and verifies reach past 502):
#
#   ...Revk   401 "Invalid API Key provided" on every probe (connect: 422 key_rejected)
#   ...NoCp   Coupons denied (403), the rest granted (connect: 422 missing_permissions)
#   anything else: every resource granted (404 resource_missing on the probe's made-up id)
#
# Webhook endpoints (create, retrieve, delete) are kept in memory with their signing secret
# (FakeStripe.endpoints), so that the fuzz set-up finds the connection id in our URL and
# signs deliveries to it.

PROBES = [
    ("customers", re.compile(r"^/v1/customers/(cus_[A-Za-z0-9_]+)$"), "customer"),
    ("checkout_sessions", re.compile(r"^/v1/checkout/sessions/(cs_[A-Za-z0-9_]+)/expire$"), "checkout.session"),
    ("coupons", re.compile(r"^/v1/coupons/([A-Za-z0-9_]+)$"), "coupon"),
    ("invoices", re.compile(r"^/v1/invoices/(in_[A-Za-z0-9_]+)$"), "invoice"),
    ("webhook_endpoints", re.compile(r"^/v1/webhook_endpoints/(we_[A-Za-z0-9_]+)$"), "webhook_endpoint"),
]
ENDPOINT = re.compile(r"^/v1/webhook_endpoints/(we_[A-Za-z0-9]+)$")
DENIED = {"NoCp": {"coupons"}}

class StripeJsonHandler(BaseHTTPRequestHandler):
    """What every Stripe stand-in answers with: JSON, a request id and the version asked
    for (this file's and scripts/lib/chaos.py's)."""

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


class FakeStripeHandler(StripeJsonHandler):

    def handle_any(self):
        length = int(self.headers.get("Content-Length") or 0)
        form = parse_qs(self.rfile.read(length).decode("utf-8", "replace"))
        path = urlsplit(self.path).path
        key = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
        last4 = key[-4:]
        endpoints, lock = self.server.endpoints, self.server.lock
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



class FakeStripe(ThreadingHTTPServer):
    """The fake Stripe on a free 127.0.0.1 port, served from a thread of this process."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), FakeStripeHandler)
        self.endpoints = {}
        self.lock = threading.Lock()
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def stop(self):
        self.shutdown()
        self.server_close()


# ---------------------------------------------------------------------------------------
# Schemathesis' reports (scripts/fuzz)


def report_counts(junit_path):
    """(passed, failed): operations without and with a failure or error."""
    try:
        cases = list(ET.parse(junit_path).getroot().iter("testcase"))
    except (OSError, ET.ParseError):
        cases = []
    failed = sum(1 for c in cases if c.find("failure") is not None or c.find("error") is not None)
    return len(cases) - failed, failed


def report_statuses(ndjson_path):
    """Lines naming, per operation, how often each status answered (405s come from the
    coverage phase's unexpected methods)."""
    seen = collections.defaultdict(collections.Counter)
    try:
        with open(ndjson_path, encoding="utf-8") as f:
            lines = f.readlines()
    except OSError:
        return []
    for line in lines:
        event = json.loads(line).get("ScenarioFinished")
        recorder = (event or {}).get("recorder") or {}
        for interaction in (recorder.get("interactions") or {}).values():
            response = interaction.get("response") or {}
            seen[recorder.get("label", "?")][response.get("status_code", "none")] += 1
    out = []
    for label in sorted(seen):
        tally = " ".join(f"{status}x{n}" for status, n in sorted(seen[label].items(), key=str))
        out.append(f"    {label:<56} {tally}")
    return out


# ---------------------------------------------------------------------------------------
# Fuzzing (scripts/fuzz)


def wait_line(path, pattern, seconds=20):
    """The first line of the file at PATH matching PATTERN, waiting up to SECONDS."""
    regex = re.compile(pattern)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                for line in f:
                    if regex.search(line):
                        return line
        except OSError:
            pass
        time.sleep(0.1)
    with open(path, encoding="utf-8", errors="replace") as f:
        raise SystemExit(f"{path}: no line matching {pattern} within {seconds} s:\n{f.read()}")


def wait_http(url, seconds=10):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"{url} did not answer")


def http(method, url, token=None, body=None, headers=None):
    """The body of a 2xx answer; anything else ends the run (the set-up must succeed)."""
    request = urllib.request.Request(url, method=method, data=body, headers=dict(headers or {}))
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.read()
    except urllib.error.HTTPError as e:
        raise SystemExit(f"{method} {urlsplit(url).path}: {e.code} {e.read()[:500]!r}") from e


def run_text(argv, env, log):
    """The stdout of ARGV, stripped; its stderr goes to LOG (a file open for appending)."""
    return subprocess.run(argv, env=env, stderr=log, stdout=subprocess.PIPE, check=True,
                          text=True).stdout.strip()


def service_scopes(openapi):
    """Every service-token scope the description's operations name."""
    return sorted({scope for item in openapi["paths"].values() for op in item.values()
                   for requirement in op.get("security", [])
                   for scope in requirement.get("service_token", [])})


def stripe_signature(secret, now, body):
    message = f"{now}.".encode() + body
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def stop(process):
    """SIGTERM, then waits (SIGKILL after 30 s)."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def fuzz_backend(args, name, database_url):
    """For one backend: fresh secrets, a fake Stripe (so connect and verify reach past 502),
    connected tenants ten_0…ten_2 seeded through the store (the seed-tenants example), ten_0
    reconnected through the API so that it has a webhook endpoint and two delivered events,
    a service token with every scope the description names and a tenant token for ten_0
    (scripts/lib/schemathesis.toml gives each operation the one its security scheme names);
    then two Schemathesis runs, the disconnect last and on its own. Returns (passed, failed)."""
    artifacts = args.artifacts
    stripe = FakeStripe()
    env = dict(os.environ)
    env.update({
        "ATLAS_STRIPE__DATABASE__URL": database_url,
        # The service binds a port of its own choosing (port 0) and says which: a port
        # picked beforehand may be taken meanwhile, if only as an outgoing connection's.
        "ATLAS_STRIPE__SERVER__BIND": "127.0.0.1:0",
        "ATLAS_STRIPE__STRIPE__API_BASE": stripe.url,
        "ATLAS_STRIPE__STRIPE__MAX_RETRIES": "0",
        "ATLAS_STRIPE__STRIPE__CONNECT_TIMEOUT_MS": "500",
        "ATLAS_STRIPE__STRIPE__REQUEST_TIMEOUT_MS": "2000",
        # The fuzzer is to reach each route's own answers, not the per-tenant limits.
        "ATLAS_STRIPE__LIMITS__CONNECT_ATTEMPTS_PER_MINUTE": "1000000",
        "ATLAS_STRIPE__LIMITS__VERIFY_ATTEMPTS_PER_MINUTE": "1000000",
        "ATLAS_STRIPE__REVERIFY__ENABLED": "false",
        "ATLAS_STRIPE__DEV__GENERATE_SECRETS": "false",
        "ATLAS_STRIPE__LOG__FILTER": "warn",
        "ATLAS_STRIPE__CRYPTO__ACTIVE_KEY_ID": "bench1",
        "ATLAS_STRIPE__CRYPTO__FINGERPRINT_KEY": base64.b64encode(os.urandom(32)).decode(),
        "ATLAS_STRIPE__AUTH__TENANT_TOKEN_SECRET": base64.b64encode(os.urandom(48)).decode(),
    })
    service = None
    with open(os.path.join(artifacts, f"{name}-setup.log"), "a") as setup_log:
        try:
            env["ATLAS_STRIPE__CRYPTO__MASTER_KEYS"] = run_text(
                [args.bin, "keys", "generate", "--id", "bench1"], env, setup_log)
            print(f"==> fuzz ({name}): seeding tenants ten_0…ten_2, tokens", flush=True)
            run_text([args.seed_tenants, "--tenants", "3"], env, setup_log)

            # JSON logs, warnings and the start-up line that names the port.
            service_log = os.path.join(artifacts, f"{name}-service.log")
            with open(service_log, "w") as log:
                service = subprocess.Popen(
                    [args.bin, "serve"], stdout=log, stderr=subprocess.STDOUT,
                    env={**env, "ATLAS_STRIPE__LOG__FORMAT": "json",
                         "ATLAS_STRIPE__LOG__FILTER": "warn,atlas_stripe::cli=info"})
            serving = wait_line(service_log, r'"message":"serving"')
            base = f"http://127.0.0.1:{json.loads(serving)['port']}"
            wait_http(f"{base}/readyz")

            scopes = service_scopes(json.loads(http("GET", f"{base}/openapi.json")))
            service_token = run_text(
                [args.bin, "service-token", "create", "--name", "fuzz"]
                + [a for scope in scopes for a in ("--scope", scope)], env, setup_log)
            tenant_token = run_text([args.bin, "tenant-token", "--tenant", "ten_0"], env, setup_log)

            # ten_0 again through the API: the fake Stripe grants everything and registers
            # our webhook endpoint, whose URL names the connection and whose secret signs
            # deliveries.
            http("POST", f"{base}/v1/tenants/ten_0/stripe/connection", tenant_token,
                 # Built at run time: no key-shaped literal in the source. The fake Stripe
                 # grants every resource to a key ending in anything but its markers.
                 json.dumps({"api_key": "rk_" + "test_51" + secrets.token_hex(12) + "Good"})
                 .encode(),
                 {"content-type": "application/json"})
            with stripe.lock:
                [endpoint] = stripe.endpoints.values()
            connection_id = endpoint["url"].rsplit("/", 1)[1]
            for event in (1, 2):
                now = int(time.time())
                body = json.dumps({
                    "id": f"evt_fuzz{event}", "object": "event", "type": "invoice.paid",
                    "created": now, "livemode": False,
                    "data": {"object": {"id": f"in_fuzz{event}", "object": "invoice"}},
                }).encode()
                signature = stripe_signature(endpoint["secret"], now, body)
                http("POST", f"{base}/webhooks/stripe/{connection_id}", None, body,
                     {"content-type": "application/json",
                      "Stripe-Signature": f"t={now},v1={signature}"})

            st_env = {**env, "FUZZ_SERVICE_TOKEN": service_token,
                      "FUZZ_TENANT_TOKEN": tenant_token, "FUZZ_CONNECTION_ID": connection_id}
            passed = failed = 0
            # The disconnect runs last, on its own: before it, every other operation sees
            # ten_0 connected.
            for run, methods in (("main", ["--exclude-method", "DELETE"]),
                                 ("disconnect", ["--include-method", "DELETE"])):
                p, f = schemathesis_run(args, name, run, base, methods, st_env, service_log)
                passed, failed = passed + p, failed + f
            return passed, failed
        finally:
            if service is not None:
                stop(service)
            stripe.stop()


def schemathesis_run(args, name, run, base, methods, env, service_log):
    """One Schemathesis run, bounded in time. Returns (passed, failed) operations."""
    report = os.path.join(args.artifacts, f"{name}-{run}")
    print(f"==> fuzz ({name}, {run}): schemathesis, seed {args.seed}, "
          f"at most {args.max_examples} examples per operation", flush=True)
    argv = [
        os.path.join(args.venv, "bin", "st"), "--config-file", "scripts/lib/schemathesis.toml",
        "run", f"{base}/openapi.json", *methods,
        "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,"
        "response_schema_conformance",
        "--phases", "examples,coverage,fuzzing",
        "--seed", str(args.seed), "--max-examples", str(args.max_examples), "--workers", "1",
        "--generation-database", "none", "--generation-with-security-parameters", "false",
        # Hypothesis' own health checks judge the generator, not the service: too_slow on
        # a loaded machine, filter_too_much on the proxy's operations, whose three optional
        # headers make many generated values unsendable (seen once on PostgreSQL only).
        "--suppress-health-check", "too_slow,filter_too_much", "--request-timeout", "10",
        "--no-color",
        "--report", "junit,ndjson", "--report-junit-path", f"{report}.xml",
        "--report-ndjson-path", f"{report}.ndjson",
    ]
    timed_out = False
    with open(f"{report}.txt", "w") as out:
        st = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            status = st.wait(timeout=args.run_timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            stop(st)
            status = st.returncode
        except BaseException:
            # Stopped from outside (SIGTERM, Ctrl-C): Schemathesis is not left running.
            stop(st)
            raise
    passed, failed = report_counts(f"{report}.xml")
    # Stopped by the time bound, or failed before any operation ran: a failure all the same.
    if (status != 0 or timed_out) and failed == 0:
        failed = 1
    with open(f"{report}.txt", encoding="utf-8", errors="replace") as f:
        text = f.read()
    if status != 0 or timed_out:
        print(text)
        if timed_out:
            print(f"schemathesis stopped after {args.run_timeout}s")
        print(f"--- the service's log ({name}):")
        with open(service_log, encoding="utf-8", errors="replace") as f:
            print("".join(f.readlines()[-50:]))
    else:
        print("\n".join(line for line in text.splitlines()
                        if re.match(r"^  [0-9]+ generated", line)))
    print("  statuses answered, per operation:")
    print("\n".join(report_statuses(f"{report}.ndjson")), flush=True)
    return passed, failed


def fuzz_command(args):
    shutil.rmtree(args.artifacts, ignore_errors=True)
    os.makedirs(args.artifacts)
    passed = failed = 0
    for backend in args.backends:
        name, _, url = backend.partition("=")
        p, f = fuzz_backend(args, name, url)
        passed, failed = passed + p, failed + f
    print(f"fuzz: {passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


# ---------------------------------------------------------------------------------------
# Benchmark rows (scripts/bench-key-fetch, scripts/bench-proxy)


def cpu_ticks(pid):
    """User + system CPU time of PID, in clock ticks (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    # After "pid (comm)": state is field 0, utime 11, stime 12 (proc(5) numbers them 14, 15).
    return int(fields[11]) + int(fields[12])


def postgres_pids(data_dir):
    """The postmaster of the cluster at DATA_DIR and its children."""
    with open(os.path.join(data_dir, "postmaster.pid")) as f:
        postmaster = int(f.readline())
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid == postmaster:
                children.append(int(entry))
    return [postmaster, *children]


def to_ms(latency):
    """wrk's latency (51.2ms, 1.02s, 900us) in milliseconds."""
    found = re.fullmatch(r"([0-9.]+)(us|ms|s|m)", latency)
    if not found:
        raise SystemExit(f"wrk latency not understood: {latency!r}")
    value, unit = float(found[1]), found[2]
    return value * {"us": 0.001, "ms": 1, "s": 1000, "m": 60000}[unit]


def parse_wrk(out):
    """Requests/sec, p50, p99, non-2xx answers and requests from wrk --latency's output."""
    def find(pattern):
        found = re.search(pattern, out, re.MULTILINE)
        if not found:
            raise SystemExit(f"not in wrk's output ({pattern}):\n{out}")
        return found[1]
    non2xx = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", out)
    return {
        "rps": float(find(r"^Requests/sec:\s*([0-9.]+)")),
        "p50": find(r"^\s*50%\s+(\S+)"),
        "p99": find(r"^\s*99%\s+(\S+)"),
        "non2xx": int(non2xx[1]) if non2xx else 0,
        "requests": int(find(r"^\s*(\d+) requests in")),
    }


def wrk_command(args):
    """Runs wrk (the arguments after --), prints one row and appends its figures to
    --results as a JSON line. With --pid, also the CPU time per request of that server
    and, with --pg-data, of the PostgreSQL cluster: where each route's machine time goes,
    not only how fast it is."""
    pids = [args.pid] if args.pid else []
    pg = postgres_pids(args.pg_data) if args.pg_data else []
    own_before = sum(cpu_ticks(p) for p in pids)
    pg_before = sum(cpu_ticks(p) for p in pg)
    done = subprocess.run(["wrk", *args.wrk], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
    if done.returncode != 0:
        raise SystemExit(f"wrk failed ({done.returncode}):\n{done.stdout}")
    row = parse_wrk(done.stdout)
    row["key"] = args.key
    line = (f"{args.label:<{args.width}} {row['rps']:12.2f} req/s   p50 {row['p50']:>9}   "
            f"p99 {row['p99']:>9}   non-2xx {row['non2xx']}")
    if pids:
        line = f"{line:<{args.width + 65}}"
        hz = os.sysconf("SC_CLK_TCK")
        per_request = 1e6 / hz / max(row["requests"], 1)
        own = (sum(cpu_ticks(p) for p in pids) - own_before) * per_request
        line += f"  cpu/req: server {own:3.0f} us"
        if pg:
            # Backends started during the run are counted from zero; ended ones are lost.
            pg_now = sum(cpu_ticks(p) for p in postgres_pids(args.pg_data))
            line += f", postgres {(pg_now - pg_before) * per_request:3.0f} us"
    print(line, flush=True)
    with open(args.results, "a") as f:
        f.write(json.dumps(row) + "\n")
    if args.require_2xx and row["non2xx"]:
        raise SystemExit(f"{args.label}: {row['non2xx']} answers were not 2xx")
    return 0


def bench_summary_command(args):
    with open(args.results) as f:
        rows = {row["key"]: row for row in map(json.loads, f)}
    if args.bench == "key-fetch":
        print(f"key fetch / bare select = {rows['a']['rps'] / rows['b']['rps']:.2f}   "
              "(target >= 0.90, issue 25)")
        print(f"key fetch p99 = {to_ms(rows['a']['p99']):.2f} ms, bare select p99 = "
              f"{to_ms(rows['b']['p99']):.2f} ms   (target: fetch < 8 ms)")
        print(f"our /healthz / bare /healthz = {rows['c']['rps'] / rows['d']['rps']:.2f}   "
              "(target >= 0.90)")
    else:
        print(f"proxied / direct = {rows['b']['rps'] / rows['a']['rps']:.2f}   (target >= 0.90)")
        added = to_ms(rows["b"]["p50"]) - to_ms(rows["a"]["p50"])
        print(f"p50 added by the proxy = {added:.2f} ms   (target <= 2 ms)")
    return 0


def rewrap_command(args):
    """Runs the rewrap and reports its rate and its peak memory (the child's max RSS)."""
    started = time.monotonic()
    child = subprocess.Popen(args.command)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.monotonic() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"{' '.join(args.command)}: exit status {child.returncode}")
    # ru_maxrss is in KiB on Linux.
    print(f"rewrap: {args.secrets} secrets in {seconds:.2f} s = {args.secrets / seconds:.0f} "
          f"secrets/s, peak RSS {usage.ru_maxrss / 1024:.1f} MiB")
    return 0


# ---------------------------------------------------------------------------------------
# Clean-up check (scripts/test)

MARK = "ATLAS_CLEAN_RUN_MARK"


def marked_processes(mark):
    """(pid, command line) of every process whose environment holds MARK=mark: what the
    checked command started, whatever became of its parent (pg_ctl's server, say)."""
    needle = f"{MARK}={mark}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                found.append((int(entry), f.read().replace(b"\0", b" ").decode(errors="replace")))
        except OSError:
            continue
    return found


def clean_run_command(args):
    """Runs the command with a temporary directory of its own (TMPDIR) and a mark in its
    environment; fails unless it exits 0, no marked process outlives it (a moment's grace
    for ones being reaped) and its TMPDIR is empty. With --log its output goes there and is
    printed when the check fails."""
    mark = secrets.token_hex(8)
    tmp = tempfile.mkdtemp(prefix=f"atlas-stripe-clean-{args.name}.")
    # Open to all, as /tmp is: PostgreSQL runs as `nobody` under it (scripts/lib/pg.sh).
    os.chmod(tmp, 0o1777)
    env = {**os.environ, MARK: mark, "TMPDIR": tmp}
    started = time.monotonic()
    if args.log:
        os.makedirs(os.path.dirname(os.path.abspath(args.log)), exist_ok=True)
        with open(args.log, "w") as log:
            status = subprocess.run(args.command, env=env, stdout=log,
                                    stderr=subprocess.STDOUT).returncode
    else:
        status = subprocess.run(args.command, env=env).returncode
    seconds = time.monotonic() - started
    left = marked_processes(mark)
    for _ in range(20):
        if not left:
            break
        time.sleep(0.1)
        left = marked_processes(mark)
    files = sorted(os.listdir(tmp))
    problems = []
    if status != 0:
        problems.append(f"exit status {status}")
    problems += [f"process left: {pid} {cmdline}" for pid, cmdline in left]
    problems += [f"left in TMPDIR: {name}" for name in files]
    # Leave nothing behind either: SIGTERM (PostgreSQL's postmaster then stops its
    # backends), SIGKILL to whatever still runs after 5 s.
    for signal_number in (15, 9):
        for pid, _ in left:
            try:
                os.kill(pid, signal_number)
            except OSError:
                pass
        for _ in range(50):
            left = marked_processes(mark)
            if not left:
                break
            time.sleep(0.1)
    shutil.rmtree(tmp, ignore_errors=True)
    if problems:
        if args.log:
            with open(args.log, encoding="utf-8", errors="replace") as f:
                print(f.read())
        print(f"clean-run {args.name}: FAILED after {seconds:.1f} s")
        print("\n".join(f"  {p}" for p in problems))
        return 1
    print(f"clean-run {args.name}: exit 0, no process left, TMPDIR empty, {seconds:.1f} s")
    return 0


def main():
    # SIGTERM (the scripts' clean-up sends it) unwinds like Ctrl-C, through the `finally`
    # blocks that stop what this started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fuzz")
    p.add_argument("--bin", required=True)
    p.add_argument("--seed-tenants", required=True)
    p.add_argument("--venv", required=True)
    p.add_argument("--artifacts", required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--max-examples", type=int, required=True)
    p.add_argument("--run-timeout", type=float, required=True)
    p.add_argument("backends", nargs="+", metavar="NAME=DATABASE_URL")
    p.set_defaults(run=fuzz_command)

    p = sub.add_parser("wrk")
    p.add_argument("--label", required=True)
    p.add_argument("--width", type=int, default=40)
    p.add_argument("--key", required=True)
    p.add_argument("--results", required=True)
    p.add_argument("--pid", type=int)
    p.add_argument("--pg-data")
    p.add_argument("--require-2xx", action="store_true")
    p.add_argument("wrk", nargs="+")
    p.set_defaults(run=wrk_command)

    p = sub.add_parser("bench-summary")
    p.add_argument("bench", choices=["key-fetch", "proxy"])
    p.add_argument("results")
    p.set_defaults(run=bench_summary_command)

    p = sub.add_parser("rewrap")
    p.add_argument("--secrets", type=int, required=True)
    p.add_argument("command", nargs="+")
    p.set_defaults(run=rewrap_command)

    p = sub.add_parser("clean-run")
    p.add_argument("name")
    p.add_argument("--log")
    p.add_argument("command", nargs="+")
    p.set_defaults(run=clean_run_command)

    args = parser.parse_args()
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
