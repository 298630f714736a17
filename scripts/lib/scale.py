#!/usr/bin/env python3
"""scripts/bench-scale's measurements: one PostgreSQL cluster (started by the script, its
URL in ATLAS_STRIPE__DATABASE__URL), a small and a large number of tenants, the targets of
issue 26 compared between the two, one line per target, and `N passed, M failed`."""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))


def log(message):
    print(f"==> {message}", file=sys.stderr, flush=True)


def psql(args, sql):
    """One value (or rows, tab-separated) from SQL on the benchmark's database."""
    url = os.environ["ATLAS_STRIPE__DATABASE__URL"]
    done = subprocess.run([args.psql, url, "-XAtq", "-F", "\t", "-c", sql], check=True,
                          capture_output=True, text=True)
    return done.stdout.strip()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url, token=None, timeout=10):
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.status, response.read()


class Service:
    """`atlas-stripe serve` on a port of its own, stopped on exit from the `with`."""

    def __init__(self, args, env=None):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "ATLAS_STRIPE__SERVER__BIND": f"127.0.0.1:{self.port}",
                    **(env or {})}
        self.args = args

    def __enter__(self):
        self.started = time.monotonic()
        self.process = subprocess.Popen([self.args.bin, "serve"], env=self.env)
        return self

    def wait_ready(self, seconds=60):
        """Seconds from the spawn until /readyz answers 200."""
        deadline = self.started + seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"the service exited ({self.process.returncode})")
            try:
                status, _ = get(self.base + "/readyz", timeout=1)
                if status == 200:
                    return time.monotonic() - self.started
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.002)
        raise SystemExit("the service was not ready within a minute")

    def __exit__(self, *_):
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def seed(args, start, end, active):
    log(f"seeding tenants {start} to {end} under {active}")
    env = {**os.environ, "ATLAS_STRIPE__CRYPTO__ACTIVE_KEY_ID": active}
    started = time.monotonic()
    done = subprocess.run([f"{args.examples}/seed-tenants", "--from", str(start),
                           "--tenants", str(end)], env=env, check=True, capture_output=True,
                          text=True)
    seconds = time.monotonic() - started
    log(f"seeded {end - start} tenants in {seconds:.1f} s; VACUUM ANALYZE")
    psql(args, "VACUUM ANALYZE")
    return done.stdout.strip(), seconds


def time_to_ready(args, runs):
    """The median of `runs` starts: spawn to the first 200 from /readyz."""
    times = []
    for _ in range(runs):
        with Service(args) as service:
            times.append(service.wait_ready())
    return statistics.median(times)


def gauge(metrics_text, name):
    for line in metrics_text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def health_refresh(service, samples):
    """The health snapshot's refresh time (`atlas_health_refresh_seconds`, the last
    refresh's), sampled `samples` times while it refreshes every 100 ms: median and max, ms."""
    seen = []
    for _ in range(samples):
        time.sleep(0.25)
        _, body = get(service.base + "/metrics")
        value = gauge(body.decode(), "atlas_health_refresh_seconds")
        if value is not None:
            seen.append(value * 1000)
    if not seen:
        raise SystemExit("atlas_health_refresh_seconds is not on /metrics")
    return statistics.median(seen), max(seen)


def page_times(service, token, path, runs):
    """Median milliseconds of `runs` GETs of one list page (after a warm-up GET)."""
    get(service.base + path, token)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        status, body = get(service.base + path, token)
        times.append((time.perf_counter() - started) * 1000)
        if status != 200 or not json.loads(body):
            raise SystemExit(f"{path}: {status}, {len(body)} bytes")
    return statistics.median(times)


def key_fetch(args, service, token, tenants, label):
    """wrk on random tenants, through scripts/lib/tools.py's wrk row: (req/s, p99 ms)."""
    results = os.path.join(args.scratch, f"wrk-{tenants}.jsonl")
    env = {**os.environ, "BENCH_TOKEN": token, "BENCH_TENANTS": str(tenants),
           "BENCH_PREFIX": "/internal/v1/tenants/ten_", "BENCH_SUFFIX": "/stripe/key"}
    subprocess.run([sys.executable, os.path.join(HERE, "tools.py"), "wrk", "--require-2xx",
                    "--key", str(tenants), "--label", label, "--results", results,
                    "--pid", str(service.process.pid), "--",
                    "-t2", f"-c{args.connections}", f"-d{args.duration}", "--latency",
                    "-s", "scripts/bench/random-tenant.lua", service.base],
                   env=env, check=True)
    with open(results) as f:
        row = json.loads(f.readlines()[-1])
    sys.path.insert(0, HERE)
    from tools import to_ms  # noqa: E402 (the one parser of wrk's latencies)
    return row["rps"], to_ms(row["p99"])


def explain(args, label):
    """Every hot statement's plan (benches/tools/explain_hot.rs); True when none reads a
    growing table sequentially."""
    env = {**os.environ, "DATABASE_URL": os.environ["ATLAS_STRIPE__DATABASE__URL"]}
    done = subprocess.run([f"{args.examples}/explain-hot"], env=env, capture_output=True,
                          text=True)
    print(f"-- plans at {label} tenants (generic plans, EXPLAIN without ANALYZE):")
    print(done.stdout, end="", flush=True)
    if done.returncode not in (0, 1):
        raise SystemExit(f"explain-hot failed:\n{done.stderr}")
    return done.returncode == 0


def rss_mib(pid):
    """The resident set of PID now, in MiB (None once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def rewrap(args, to, secrets):
    """`keys rewrap` to master key `to`: (seconds, peak RSS MiB, peak RSS MiB over the
    job's first quarter), and `keys status`' line. Flat memory is the second no higher than
    the third: a job that held what it had rewrapped would grow as it went."""
    env = {**os.environ, "ATLAS_STRIPE__CRYPTO__ACTIVE_KEY_ID": to}
    started = time.monotonic()
    child = subprocess.Popen([args.bin, "keys", "rewrap", "--batch", "5000"], env=env,
                             stdout=subprocess.DEVNULL)
    samples = []
    while True:
        pid, status, usage = os.wait4(child.pid, os.WNOHANG)
        if pid:
            break
        rss = rss_mib(child.pid)
        if rss is not None:
            samples.append((time.monotonic() - started, rss))
        time.sleep(0.1)
    seconds = time.monotonic() - started
    early = [rss for at, rss in samples if at <= seconds / 4]
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"keys rewrap exited {os.waitstatus_to_exitcode(status)}")
    status_out = subprocess.run([args.bin, "keys", "status"], env=env, check=True,
                                capture_output=True, text=True).stdout
    progress = next((line for line in status_out.splitlines() if line.startswith("rewrap:")),
                    "")
    log(f"rewrapped {secrets} secrets to {to} in {seconds:.1f} s; {progress}")
    if not progress.startswith("rewrap: 0 of"):
        raise SystemExit(f"keys status after the rewrap: {progress!r}")
    # ru_maxrss is in KiB on Linux.
    peak = usage.ru_maxrss / 1024
    return seconds, peak, max(early, default=peak)


def measure(args, size, token, ops_token, active):
    """Everything but the rewrap at `size` tenants."""
    figures = {}
    env = {"ATLAS_STRIPE__CRYPTO__ACTIVE_KEY_ID": active}
    figures["ready"] = time_to_ready(args, 3) * 1000
    with Service(args, {**env, "ATLAS_STRIPE__SERVER__HEALTH_REFRESH_MS": "100"}) as service:
        service.wait_ready()
        figures["health"] = health_refresh(service, 8 if args.quick else 20)
        last_after = psql(args, "SELECT connection_id FROM stripe_connections "
                                "ORDER BY connection_id DESC OFFSET 100 LIMIT 1")
        runs = 5 if args.quick else 20
        figures["first_page"] = page_times(service, ops_token,
                                           "/internal/v1/connections?limit=100", runs)
        figures["last_page"] = page_times(
            service, ops_token, f"/internal/v1/connections?limit=100&after={last_after}", runs)
        figures["last_page_status"] = page_times(
            service, ops_token,
            f"/internal/v1/connections?limit=100&status=active&after={last_after}", runs)
        figures["fetch"] = key_fetch(args, service, token, size, f"key fetch, {size} tenants")
    figures["plans"] = explain(args, size)
    figures["disk"] = int(psql(args, "SELECT pg_database_size(current_database())")) / size
    return figures


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--bin", required=True)
    parser.add_argument("--examples", required=True)
    parser.add_argument("--psql", required=True)
    parser.add_argument("--small", type=int, required=True)
    parser.add_argument("--large", type=int, required=True)
    parser.add_argument("--duration", required=True)
    parser.add_argument("--connections", required=True)
    parser.add_argument("--scratch", required=True)
    args = parser.parse_args()
    if args.large <= args.small:
        raise SystemExit(f"--tenants must be more than {args.small}")

    token, seeded_small = seed(args, 0, args.small, "bench1")
    ops_token = subprocess.run([args.bin, "service-token", "create", "--name", "scale",
                                "--scope", "ops:read"], check=True, capture_output=True,
                               text=True).stdout.strip()
    small = measure(args, args.small, token, ops_token, "bench1")
    small["rewrap"] = rewrap(args, "bench2", 2 * args.small)

    _, seeded_large = seed(args, args.small, args.large, "bench2")
    large = measure(args, args.large, token, ops_token, "bench2")
    large["rewrap"] = rewrap(args, "bench3", 2 * args.large)

    s, l = f"{args.small:,}", f"{args.large:,}"
    print()
    print(f"seeding: {s} in {seeded_small:.1f} s; {args.large - args.small:,} more in "
          f"{seeded_large:.1f} s ({(args.large - args.small) / seeded_large:,.0f} tenants/s)")
    rows = []

    def target(name, figure, holds):
        rows.append(holds)
        print(f"{'holds' if holds else 'FAILS'}  {name}: {figure}")

    (rps_s, p99_s), (rps_l, p99_l) = small["fetch"], large["fetch"]
    target(f"key fetch req/s at {l} within 10% of at {s}",
           f"{rps_l:,.0f} vs {rps_s:,.0f} req/s ({rps_l / rps_s:.2f})", rps_l >= 0.9 * rps_s)
    target(f"key fetch p99 at {l} within 10% of at {s}",
           f"{p99_l:.2f} vs {p99_s:.2f} ms ({p99_l / p99_s:.2f})", p99_l <= 1.1 * p99_s)
    for size, figures in ((s, small), (l, large)):
        median, worst = figures["health"]
        target(f"health snapshot refresh under 5 ms at {size}",
               f"median {median:.2f} ms, max {worst:.2f} ms", median < 5)
    target(f"time to ready at {l} within 10% of at {s}",
           f"{large['ready']:.0f} vs {small['ready']:.0f} ms (median of 3 starts, "
           f"{large['ready'] / small['ready']:.2f})", large["ready"] <= 1.1 * small["ready"])
    for key, what in (("first_page", "first page"), ("last_page", "last page"),
                      ("last_page_status", "last page of status=active")):
        target(f"connections list, {what} of 100, under 20 ms at {l}",
               f"{large[key]:.1f} ms (at {s}: {small[key]:.1f} ms)", large[key] < 20)
    seconds, rss, rss_early = large["rewrap"]
    target(f"rewrap of {l} tenants' API keys and webhook secrets ({2 * args.large:,} "
           "secrets) under 120 s",
           f"{seconds:.1f} s = {2 * args.large / seconds:,.0f} secrets/s", seconds < 120)
    # At the small size the job ends before its pipeline fills (two batches of 5,000), so
    # memory is judged within the large job: its peak against its first quarter's.
    target(f"rewrap peak RSS flat at {l} (whole job within 20% of its first quarter)",
           f"{rss:.1f} vs {rss_early:.1f} MiB (at {s}: {small['rewrap'][1]:.1f} MiB)",
           rss <= 1.2 * rss_early)
    target(f"PostgreSQL disk per tenant at {l} within 1.5x of at {s}",
           f"{large['disk'] / 1024:.1f} KiB vs {small['disk'] / 1024:.1f} KiB per tenant",
           large["disk"] <= 1.5 * small["disk"])
    for size, figures in ((s, small), (l, large)):
        target(f"no hot statement reads a growing table sequentially at {size}",
               "every plan an index lookup or range" if figures["plans"] else "see the plans",
               figures["plans"])
    passed = sum(rows)
    print(f"{passed} passed, {len(rows) - passed} failed")
    if args.quick:
        # Timings in a debug build on a loaded machine are no figures; the plans are.
        return 0 if small["plans"] and large["plans"] else 1
    return 0 if passed == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
