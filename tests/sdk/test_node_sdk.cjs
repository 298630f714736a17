// Stripe's official Node SDK (npm `stripe`, pinned in tests/sdk/package-lock.json) as a
// charging service uses it, pointed at the proxy: the API base
// `…/internal/v1/tenants/{id}/stripe` and the service token as the key. Run by scripts/sdk
// with the environment described in test_python_sdk.py, plus SDK_NODE_DIR (where npm ci put
// the SDK). Prints one line per test; writes "PASSED FAILED" to the file named by the
// first argument.
'use strict';

const assert = require('node:assert/strict');
const fs = require('node:fs');
const path = require('node:path');
const { createRequire } = require('node:module');
const crypto = require('node:crypto');

const Stripe = createRequire(path.join(process.env.SDK_NODE_DIR, 'package.json'))('stripe');

const PROXY = process.env.SDK_PROXY_BASE;
const TOKEN = process.env.SDK_TOKEN;
const STANDIN = process.env.SDK_STANDIN;
const TENANT = process.env.SDK_TENANT;
const BURST_TENANT = process.env.SDK_BURST_TENANT;
const ALLOWED_VERSIONS = process.env.SDK_VERSIONS.split(',');
const RUN = crypto.randomBytes(4).toString('hex');
const TELEMETRY = ['x-stripe-client-user-agent', 'x-stripe-client-telemetry'];

// stripe-node takes a host, port and protocol but no path: the API base's path goes in
// front of each request's through its own HTTP client (README: "Node").
function client(tenant = TENANT, options = {}) {
  const base = new URL(`${PROXY}/${tenant}/stripe`);
  const http = Stripe.createNodeHttpClient();
  const makeRequest = http.makeRequest.bind(http);
  http.makeRequest = (host, port, requestPath, ...rest) =>
    makeRequest(host, port, base.pathname + requestPath, ...rest);
  return new Stripe(TOKEN, {
    host: base.hostname,
    port: base.port,
    protocol: base.protocol.replace(':', ''),
    httpClient: http,
    maxNetworkRetries: 2,
    ...options,
  });
}

async function standin(requestPath, method = 'GET') {
  const answer = await fetch(STANDIN + requestPath, { method });
  assert.equal(answer.status, 200, `${requestPath}: ${answer.status}`);
  return answer.json();
}

async function arrived(predicate) {
  return (await standin('/__standin/requests')).filter(predicate);
}

const header = (request, name) => (request.headers.find(([k]) => k === name) || [])[1];

async function expectError(Kind, call, status, code, type) {
  let error;
  try {
    await call();
  } catch (e) {
    error = e;
  }
  assert.ok(error, `no error, expected ${Kind.name}`);
  assert.ok(error instanceof Kind, `${error.constructor.name} (${error.statusCode}, ${error.code}), expected ${Kind.name}`);
  assert.equal(error.statusCode, status);
  assert.equal(error.code, code);
  assert.equal(error.rawType, type);
  return error;
}

const tests = [];
const test = (name, fn) => tests.push([name, fn]);

test('customers create, retrieve, update, list', async () => {
  const s = client().customers;
  const email = `node-${RUN}@example.test`;
  const made = await s.create({ email, name: 'Grace', metadata: { run: RUN } });
  assert.match(made.id, /^cus_/);
  assert.equal((await s.retrieve(made.id)).name, 'Grace');
  const changed = await s.update(made.id, { name: 'Grace H.', metadata: { plan: 'pro' } });
  assert.equal(changed.name, 'Grace H.');
  assert.equal(changed.metadata.plan, 'pro');
  assert.deepEqual((await s.list({ email, limit: 5 })).data.map((c) => c.id), [made.id]);
});

test('checkout sessions create, retrieve, list, expire', async () => {
  const stripe = client();
  const customer = await stripe.customers.create({ email: `node-cs-${RUN}@example.test` });
  const made = await stripe.checkout.sessions.create({
    mode: 'payment',
    customer: customer.id,
    success_url: 'https://example.test/ok',
    line_items: [{ price: 'price_123', quantity: 2 }],
  });
  assert.match(made.id, /^cs_/);
  assert.equal((await stripe.checkout.sessions.retrieve(made.id)).customer, customer.id);
  const listed = await stripe.checkout.sessions.list({ customer: customer.id });
  assert.ok(listed.data.some((x) => x.id === made.id));
  assert.equal((await stripe.checkout.sessions.expire(made.id)).status, 'expired');
});

test('coupons create, retrieve, update, list', async () => {
  const s = client().coupons;
  const made = await s.create({ id: `NODE${RUN}`, amount_off: 500, currency: 'usd', duration: 'once' });
  assert.equal(made.amount_off, 500);
  assert.equal((await s.retrieve(made.id)).currency, 'usd');
  assert.equal((await s.update(made.id, { name: 'Five off' })).name, 'Five off');
  assert.ok((await s.list({ limit: 100 })).data.some((c) => c.id === made.id));
});

test('invoice items create, retrieve, update, list', async () => {
  const stripe = client();
  const customer = await stripe.customers.create({ email: `node-ii-${RUN}@example.test` });
  const made = await stripe.invoiceItems.create({ customer: customer.id, amount: 1500, currency: 'usd' });
  assert.match(made.id, /^ii_/);
  assert.equal((await stripe.invoiceItems.retrieve(made.id)).amount, 1500);
  assert.equal((await stripe.invoiceItems.update(made.id, { description: 'Seats' })).description, 'Seats');
  const listed = await stripe.invoiceItems.list({ customer: customer.id });
  assert.deepEqual(listed.data.map((x) => x.id), [made.id]);
});

test('invoices create, retrieve, update, list, finalize, pay', async () => {
  const stripe = client();
  const customer = await stripe.customers.create({ email: `node-in-${RUN}@example.test` });
  await stripe.invoiceItems.create({ customer: customer.id, amount: 4200, currency: 'usd' });
  const made = await stripe.invoices.create({ customer: customer.id });
  assert.equal(made.status, 'draft');
  assert.equal(made.amount_due, 4200);
  assert.equal((await stripe.invoices.retrieve(made.id)).customer, customer.id);
  assert.equal((await stripe.invoices.update(made.id, { description: 'June' })).description, 'June');
  const listed = await stripe.invoices.list({ customer: customer.id });
  assert.deepEqual(listed.data.map((x) => x.id), [made.id]);
  assert.equal((await stripe.invoices.finalizeInvoice(made.id)).status, 'open');
  const paid = await stripe.invoices.pay(made.id);
  assert.equal(paid.status, 'paid');
  assert.equal(paid.amount_paid, 4200);
});

test("Stripe's 404 is the SDK's StripeInvalidRequestError", async () => {
  const e = await expectError(Stripe.errors.StripeInvalidRequestError,
    () => client().invoices.retrieve('in_nosuchinvoice'), 404, 'resource_missing', 'invalid_request_error');
  assert.equal(e.param, 'id');
});

test("Stripe's 402 is the SDK's StripeCardError", async () => {
  const stripe = client();
  const customer = await stripe.customers.create({ metadata: { standin: 'decline' } });
  await stripe.invoiceItems.create({ customer: customer.id, amount: 900, currency: 'usd' });
  const draft = await stripe.invoices.create({ customer: customer.id });
  const invoice = await stripe.invoices.finalizeInvoice(draft.id);
  const e = await expectError(Stripe.errors.StripeCardError,
    () => stripe.invoices.pay(invoice.id), 402, 'card_declined', 'card_error');
  assert.equal(e.decline_code, 'generic_decline');
});

test("our 403 is the SDK's StripePermissionError", async () => {
  await expectError(Stripe.errors.StripePermissionError,
    () => client().payouts.create({ amount: 100, currency: 'usd' }),
    403, 'endpoint_not_allowed', 'invalid_request_error');
});

test("our 404 is the SDK's StripeInvalidRequestError", async () => {
  await expectError(Stripe.errors.StripeInvalidRequestError,
    () => client('ten_neverconnected').customers.list(), 404, 'not_connected', 'invalid_request_error');
});

test("our 429 is the SDK's StripeRateLimitError", async () => {
  const stripe = client(BURST_TENANT, { maxNetworkRetries: 0 });
  // Well over what proxy.test_requests_per_second lets through within proxy.max_wait_ms.
  const outcomes = await Promise.all(Array.from({ length: 96 }, () =>
    stripe.coupons.list({ limit: 1 }).then(() => 'ok', (e) => {
      assert.ok(e instanceof Stripe.errors.StripeRateLimitError, `${e.constructor.name} ${e.statusCode}`);
      assert.equal(e.statusCode, 429);
      assert.equal(e.code, 'rate_limited');
      assert.equal(e.rawType, 'rate_limit_error');
      return 'limited';
    })));
  assert.ok(outcomes.includes('ok') && outcomes.includes('limited'),
    `${outcomes.filter((o) => o === 'ok').length} ok, ${outcomes.filter((o) => o === 'limited').length} limited`);
});

test('a POST retried after a 500 creates one object', async () => {
  const stripe = client();
  const email = `node-retry-${RUN}@example.test`;
  await standin('/__standin/fail?count=1', 'POST');
  const made = await stripe.customers.create({ email });
  assert.equal(made.email, email);
  const listed = await stripe.customers.list({ email });
  assert.deepEqual(listed.data.map((c) => c.id), [made.id], 'one customer, not two');
  const posts = await arrived((r) => r.method === 'POST' && r.path === '/v1/customers'
    && r.form.includes(encodeURIComponent(email)));
  const keys = new Set(posts.map((r) => header(r, 'idempotency-key')));
  assert.equal(posts.length, 2, 'the first attempt and the SDK\'s retry');
  assert.equal(keys.size, 1);
  assert.ok(!keys.has(undefined), 'an Idempotency-Key on both');
});

test("the caller's Stripe-Version arrives unchanged, telemetry does not", async () => {
  const before = (await standin('/__standin/requests')).length;
  const stripe = client();
  await stripe.customers.list({ limit: 1 });
  // The SDK sends its telemetry with the request after one it has timed.
  await stripe.customers.list({ limit: 2 });
  const ours = (await standin('/__standin/requests')).slice(before);
  assert.equal(ours.length, 2, `${ours.length} requests reached the stand-in`);
  for (const r of ours) {
    assert.equal(header(r, 'stripe-version'), stripe.getApiField('version'));
    for (const name of TELEMETRY) assert.equal(header(r, name), undefined, `${name} reached Stripe`);
    assert.match(header(r, 'authorization') || '', /^Bearer rk_test_/, "the tenant's key");
  }
});

test('without the proxy, the SDK does send its telemetry', async () => {
  // What the test above holds the proxy to: the SDK does send these to Stripe directly.
  const before = (await standin('/__standin/requests')).length;
  const url = new URL(STANDIN);
  const direct = new Stripe('sk_test_direct', { host: url.hostname, port: url.port, protocol: 'http' });
  await direct.customers.list({ limit: 1 });
  await direct.customers.list({ limit: 1 });
  const sent = (await standin('/__standin/requests')).slice(before);
  assert.equal(sent.length, 2);
  for (const name of TELEMETRY) assert.ok(header(sent[1], name), `the SDK sent no ${name}`);
});

test('a version the setting does not list is refused, naming the allowed ones', async () => {
  const e = await expectError(Stripe.errors.StripeInvalidRequestError,
    () => client(TENANT, { apiVersion: '2025-03-31.basil' }).customers.list(),
    400, 'invalid_request', 'invalid_request_error');
  for (const version of ALLOWED_VERSIONS) assert.ok(e.message.includes(version), e.message);
});

test('another account is refused by name', async () => {
  for (const [option, name] of [['stripeAccount', 'Stripe-Account'], ['stripeContext', 'Stripe-Context']]) {
    const e = await expectError(Stripe.errors.StripeInvalidRequestError,
      () => client().customers.list({}, { [option]: 'acct_1Other' }), 400, 'invalid_request', 'invalid_request_error');
    assert.ok(e.message.includes(name), e.message);
  }
});

(async () => {
  let passed = 0;
  let failed = 0;
  for (const [name, fn] of tests) {
    try {
      await fn();
      passed += 1;
      console.log(`  ok   node ${name}`);
    } catch (e) {
      failed += 1;
      console.log(`  FAIL node ${name}\n    ${String(e && e.stack || e).split('\n').slice(0, 4).join('\n    ')}`);
    }
  }
  fs.writeFileSync(process.argv[2], `${passed} ${failed}\n`);
})();
