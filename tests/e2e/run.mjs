// End-to-end tests of the reference connect page in headless Chromium (Debian's
// /usr/bin/chromium, driven by playwright-core), against the real service on SQLite with a
// fake Stripe. Run through scripts/e2e, which installs and builds what this needs.
//
// Every scenario fails on a console error, an uncaught page error, a request to any origin
// but the service's, or a secret left behind (in the address, Web Storage, cookies, the
// DOM or the console). Screenshots of each end state go to artifacts/e2e/ (`<name>.png`, the
// page, and `<name>-modal.png`, the modal alone). Scenarios left out by E2E_ONLY are listed
// as skipped. The last line is `N passed, M failed, K skipped`.

import { spawn, execFile } from 'node:child_process';
import crypto from 'node:crypto';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { createWriteStream } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import readline from 'node:readline';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import assert from 'node:assert/strict';

import { chromium } from 'playwright-core';

import { startFakeStripe } from './fake-stripe.mjs';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const BIN = process.env.ATLAS_STRIPE_BIN ?? path.join(ROOT, 'target/debug/atlas-stripe');
const CHROMIUM = process.env.CHROMIUM ?? '/usr/bin/chromium';
const ARTIFACTS = path.join(ROOT, 'artifacts/e2e');
const ONLY = process.env.E2E_ONLY ? new RegExp(process.env.E2E_ONLY) : null;

// The sentences the API answers with (src/domain/stripe_key.rs, src/http/error.rs).
const PUBLISHABLE = 'Paste a secret or restricted key, not the publishable key (pk_…).';
const TEST_TENANT_LIVE_KEY = 'This tenant is in test mode; the pasted key is a live key.';
const FIX_URL =
  'https://dashboard.stripe.com/test/apikeys/create?name=Atlas&permissions[]=rak_customer_write' +
  '&permissions[]=rak_checkout_session_write&permissions[]=rak_coupon_write' +
  '&permissions[]=rak_invoice_write&permissions[]=rak_webhook_write&permissions[]=rak_event_read';

const exec = promisify(execFile);

const ALNUM = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789';
function randomAlnum(length) {
  const bytes = crypto.randomBytes(length * 2);
  let out = '';
  for (const b of bytes) {
    if (b < 248) out += ALNUM[b % 62];
    if (out.length === length) break;
  }
  return out;
}

/** A key shaped like today's Stripe keys (107 characters), made at run time. */
function makeKey(prefix, last4) {
  return `${prefix}${randomAlnum(95)}${last4}`;
}

/** Every secret a test creates, to prove none is left where it must not be. */
const secrets = new Set();
function secret(value) {
  secrets.add(value);
  return value;
}

// ------------------------------------------------------------------ the service

async function startService(stripeUrl, workDir) {
  const cli = async (args, env) => (await exec(BIN, args, { env, cwd: workDir })).stdout.trim();
  const baseEnv = { ...process.env };
  for (const name of Object.keys(baseEnv)) {
    if (name.startsWith('ATLAS_STRIPE')) delete baseEnv[name];
  }
  delete baseEnv.RUST_LOG;
  const masterKeys = secret(await cli(['keys', 'generate', '--id', 'e2e'], baseEnv));
  const env = {
    ...baseEnv,
    ATLAS_STRIPE__CRYPTO__MASTER_KEYS: masterKeys,
    ATLAS_STRIPE__CRYPTO__ACTIVE_KEY_ID: 'e2e',
    ATLAS_STRIPE__CRYPTO__FINGERPRINT_KEY: secret(randomAlnum(48)),
    ATLAS_STRIPE__AUTH__TENANT_TOKEN_SECRET: secret(randomAlnum(48)),
    ATLAS_STRIPE__DEV__GENERATE_SECRETS: 'false',
    ATLAS_STRIPE__DATABASE__URL: `sqlite://${path.join(workDir, 'e2e.db')}`,
    ATLAS_STRIPE__SERVER__BIND: '127.0.0.1:0',
    ATLAS_STRIPE__STRIPE__API_BASE: stripeUrl,
    ATLAS_STRIPE__STRIPE__RETRY_BASE_DELAY_MS: '10',
    ATLAS_STRIPE__STRIPE__RETRY_MAX_DELAY_MS: '40',
    ATLAS_STRIPE__LIMITS__CONNECT_ATTEMPTS_PER_MINUTE: '1000',
    ATLAS_STRIPE__LOG__FORMAT: 'json',
    // Debug, not info: the check that no key or token reaches the log must see every line
    // a tenant's request can produce short of trace.
    ATLAS_STRIPE__LOG__FILTER: 'debug',
  };
  const serviceToken = secret(await cli(['service-token', 'create', '--name', 'e2e', '--scope', 'tenants:write'], env));

  const logPath = path.join(ARTIFACTS, 'service.log');
  const log = createWriteStream(logPath);
  const child = spawn(BIN, ['serve'], { env, cwd: workDir, stdio: ['ignore', 'pipe', 'pipe'] });
  child.stdout.pipe(log, { end: false });
  const logText = [];
  const port = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error('the service did not start within 30 s; see artifacts/e2e/service.log'));
    }, 30_000);
    child.on('exit', (code) => reject(new Error(`the service exited with ${code}; see artifacts/e2e/service.log`)));
    readline.createInterface({ input: child.stderr }).on('line', (line) => {
      log.write(`${line}\n`);
      logText.push(line);
      try {
        const event = JSON.parse(line);
        if (event.message === 'serving' && event.port) {
          clearTimeout(timer);
          resolve(event.port);
        }
      } catch {
        // not a JSON line
      }
    });
  });
  const base = `http://127.0.0.1:${port}`;
  const tenantToken = async (tenant) => secret(await cli(['tenant-token', '--tenant', tenant], env));
  return {
    base,
    logText,
    tenantToken,
    async createTenant(tenant, mode) {
      const response = await fetch(`${base}/internal/v1/tenants/${tenant}`, {
        method: 'PUT',
        headers: { Authorization: `Bearer ${serviceToken}`, 'Content-Type': 'application/json' },
        body: JSON.stringify({ mode }),
      });
      assert.equal(response.status, 201, `creating ${tenant}: ${await response.text()}`);
    },
    async stop() {
      if (child.exitCode !== null) return;
      const exited = new Promise((resolve) => child.on('exit', resolve));
      child.kill('SIGTERM');
      await exited;
      await new Promise((resolve) => log.end(resolve));
    },
  };
}

/** A tenant of its own for each scenario, so that they are independent. */
async function tenant(service, id, mode = 'test') {
  await service.createTenant(id, mode);
  const token = await service.tenantToken(id);
  const api = (method, suffix = '', body) =>
    fetch(`${service.base}/v1/tenants/${id}/stripe/connection${suffix}`, {
      method,
      headers: { Authorization: `Bearer ${token}`, ...(body ? { 'Content-Type': 'application/json' } : {}) },
      body: body ? JSON.stringify(body) : undefined,
    });
  return {
    id,
    token,
    api,
    url: `${service.base}/connect/stripe#tenant=${id}&mode=${mode}&token=${token}`,
  };
}

// ------------------------------------------------------------------ the harness

const results = [];

async function scenario(context, service, name, slug, body) {
  if (ONLY && !ONLY.test(name)) {
    results.push({ name, skipped: true });
    console.log(`skip - ${name} (E2E_ONLY=${process.env.E2E_ONLY})`);
    return;
  }
  const page = await context.newPage();
  const problems = [];
  const consoleText = [];
  const apiRequests = [];
  const origin = new URL(service.base).origin;
  // Chromium logs every non-2xx response as a console error ("Failed to load resource: the
  // server responded with a status of 404"). The API answers 404 not_connected, 422 and 502
  // by design and the page handles them, so that one line is allowed for a /v1/ response in
  // the API's error shape, and for nothing else (a missing asset still fails the test).
  const apiErrors = [];
  page.on('response', async (response) => {
    const url = new URL(response.url());
    if (url.origin !== origin || !url.pathname.startsWith('/v1/') || response.status() < 400) return;
    const pending = response.json().then(
      (body) => typeof body?.error?.code === 'string' && typeof body?.error?.message === 'string',
      () => false,
    );
    apiErrors.push({ url: response.url(), status: response.status(), shaped: pending });
  });
  const consoleErrors = [];
  page.on('console', (message) => {
    consoleText.push(message.text());
    if (message.type() === 'error') consoleErrors.push({ text: message.text(), url: message.location()?.url ?? '' });
  });
  page.on('pageerror', (error) => problems.push(`uncaught page error: ${error.message}`));
  page.on('request', (request) => {
    const url = new URL(request.url());
    if (url.origin !== origin) problems.push(`request outside the service: ${request.method()} ${url.origin}${url.pathname}`);
    if (url.pathname.startsWith('/v1/')) apiRequests.push(`${request.method()} ${url.pathname}`);
  });
  const started = Date.now();
  let failure = null;
  try {
    await body({ page, apiRequests });
    await assertNoSecretLeft(page, consoleText);
  } catch (error) {
    failure = error;
  }
  try {
    await page.screenshot({ path: path.join(ARTIFACTS, `${slug}.png`), fullPage: true });
    // The modal alone, for documentation.
    const box = page.locator('atlas-stripe-connect:not([hidden]) .modal');
    if (await box.isVisible()) await box.screenshot({ path: path.join(ARTIFACTS, `${slug}-modal.png`) });
  } catch (error) {
    problems.push(`screenshot failed: ${error.message}`);
  }
  for (const { text, url } of consoleErrors) {
    const status = text.match(/^Failed to load resource: the server responded with a status of (\d+)/)?.[1];
    const match = status && apiErrors.find((e) => e.url === url && String(e.status) === status);
    if (!(match && (await match.shaped))) problems.push(`console error: ${text}${url ? ` (${url})` : ''}`);
  }
  await page.close();
  if (!failure && problems.length > 0) {
    failure = new Error(problems.join('\n'));
    problems.length = 0;
  }
  const ms = Date.now() - started;
  results.push({ name, failure });
  if (failure) {
    console.log(`not ok - ${name} (${ms} ms)\n${indent(failure.stack ?? String(failure))}`);
    if (problems.length > 0) console.log(indent(`also:\n${problems.join('\n')}`));
  } else {
    console.log(`ok - ${name} (${ms} ms) → artifacts/e2e/${slug}.png`);
  }
}

function indent(text) {
  return text.split('\n').map((line) => `    ${line}`).join('\n');
}

/** No secret in the address, Web Storage, cookies, the page's markup or the console. */
async function assertNoSecretLeft(page, consoleText) {
  const url = page.url();
  assert.ok(!url.includes('#'), `the fragment was not removed from the address: ${url.split('#')[0]}#…`);
  const found = await page.evaluate((values) => {
    const host = document.querySelector('atlas-stripe-connect');
    const places = {
      address: location.href,
      localStorage: JSON.stringify({ ...localStorage }),
      sessionStorage: JSON.stringify({ ...sessionStorage }),
      cookie: document.cookie,
      markup: document.documentElement.outerHTML,
      shadowMarkup: host?.shadowRoot?.innerHTML ?? '',
      inputs: [...(host?.shadowRoot?.querySelectorAll('input') ?? [])].map((i) => i.value).join(' '),
    };
    const leaks = [];
    for (const [place, text] of Object.entries(places)) {
      values.forEach((value, index) => {
        if (text.includes(value)) leaks.push(`secret #${index} in ${place}`);
      });
    }
    return { leaks, storage: [localStorage.length, sessionStorage.length, document.cookie] };
  }, [...secrets]);
  assert.deepEqual(found.leaks, [], 'secrets left in the page');
  assert.deepEqual(found.storage, [0, 0, ''], 'the page stored something');
  for (const text of consoleText) {
    for (const value of secrets) assert.ok(!text.includes(value), 'a secret reached the console');
  }
}

const modal = (page) => page.locator('atlas-stripe-connect');

async function openAndWait(page, t, view) {
  const response = await page.goto(t.url);
  assert.equal(response.status(), 200);
  await page.locator(`atlas-stripe-connect[data-view="${view}"]`).waitFor();
  return response;
}

async function expectText(locator, expected) {
  await locator.waitFor();
  const text = (await locator.textContent()).replace(/\s+/g, ' ').trim();
  if (expected instanceof RegExp) assert.match(text, expected);
  else assert.equal(text, expected);
}

/** The page's instant check: the sentence, shown before any request. */
async function expectRefusedInPage(page, apiRequests, key, sentence) {
  const before = apiRequests.length;
  const field = page.getByLabel('Stripe API key');
  await field.fill(key);
  const check = modal(page).locator('#api-key-check');
  await expectText(check, sentence);
  assert.equal(await field.getAttribute('aria-invalid'), 'true');
  await page.getByRole('button', { name: 'Activate' }).click();
  await expectText(check, sentence);
  assert.equal(await field.inputValue(), '', 'the field is cleared after submit');
  // The live region is filled a tick later (so a repeated sentence is announced again).
  const status = modal(page).locator('[role="status"]');
  await status.filter({ hasText: sentence }).waitFor();
  await expectText(status, sentence);
  // The submit handler has run (it cleared the field and announced the sentence). A request
  // of our own now, after it: the browser reports requests in the order they are made, so
  // once ours is seen, any request the submit made would have been seen before it.
  await requestBarrier(page);
  assert.deepEqual(apiRequests.slice(before), [], 'no request may reach the service');
}

/** Resolves once a request made now by the page has been reported (see above). */
async function requestBarrier(page) {
  const marker = `/healthz?barrier=${crypto.randomBytes(6).toString('hex')}`;
  const seen = page.waitForRequest((r) => r.url().endsWith(marker));
  await page.evaluate((url) => fetch(url).then((r) => r.status), marker);
  await seen;
}

// ------------------------------------------------------------------ the scenarios

async function main() {
  await mkdir(ARTIFACTS, { recursive: true });
  const workDir = await mkdtemp(path.join(os.tmpdir(), 'atlas-stripe-e2e-'));
  const stripe = await startFakeStripe({ delayMs: 150 });
  let service;
  let context;
  try {
    service = await startService(stripe.url, workDir);
    context = await chromium.launchPersistentContext(path.join(workDir, 'chromium-profile'), {
      executablePath: CHROMIUM,
      headless: true,
      args: [
        '--headless',
        '--no-sandbox',
        '--disable-gpu',
        '--disable-quic',
        '--no-first-run',
        '--disable-background-networking',
        '--disable-component-update',
        '--disable-sync',
      ],
      viewport: { width: 1000, height: 1250 },
      locale: 'en-GB',
      timezoneId: 'UTC',
    });
    context.setDefaultTimeout(10_000);
    await runScenarios(context, service, stripe);
  } catch (error) {
    results.push({ name: 'set-up', failure: error });
    console.log(`not ok - set-up\n${indent(error.stack ?? String(error))}`);
  } finally {
    await context?.close();
    await service?.stop();
    await stripe.close();
    await rm(workDir, { recursive: true, force: true });
  }
  if (service) {
    // Checked after the run so that every request the scenarios made is in the log, at
    // debug level (a log at info would hide what debug lines carry).
    const leaked = [...secrets].filter((value) => service.logText.some((line) => line.includes(value)));
    const debugLines = service.logText.filter((line) => line.includes('"level":"DEBUG"')).length;
    const failure = leaked.length > 0
      ? new Error(`${leaked.length} secret(s) found in the service log`)
      : debugLines === 0 ? new Error('the service log has no debug line: the check did not run at debug') : null;
    results.push({ name: 'no key or token in the service log', failure });
    console.log(`${failure ? 'not ok' : 'ok'} - no key or token in the service log${failure ? `\n${indent(failure.message)}` : ''}`);
  }
  const failed = results.filter((r) => r.failure).length;
  const skipped = results.filter((r) => r.skipped);
  await writeFile(path.join(ARTIFACTS, 'summary.txt'),
    results.map((r) => `${r.failure ? 'FAIL' : r.skipped ? 'skip' : 'ok  '} ${r.name}`).join('\n') + '\n');
  if (skipped.length > 0) {
    console.log(`skipped under E2E_ONLY=${process.env.E2E_ONLY}:\n${skipped.map((r) => `  - ${r.name}`).join('\n')}`);
  }
  console.log(`${results.length - failed - skipped.length} passed, ${failed} failed, ${skipped.length} skipped`);
  process.exitCode = failed > 0 ? 1 : 0;
}

async function runScenarios(context, service, stripe) {
  await scenario(context, service, 'a good restricted key ends in the connected view', 'connected', async ({ page, apiRequests }) => {
    const t = await tenant(service, 'ten_e2e_good');
    const key = secret(makeKey('rk_test_', 'Good'));
    const response = await openAndWait(page, t, 'setup');
    const csp = response.headers()['content-security-policy'] ?? '';
    assert.match(csp, /script-src 'self'/);
    assert.match(csp, /connect-src 'self'/);
    assert.deepEqual(apiRequests, [`GET /v1/tenants/${t.id}/stripe/connection`]);
    await expectText(modal(page).locator('.mode-badge'), 'Test mode');
    const create = page.getByRole('link', { name: /Create the key in Stripe/ });
    assert.equal(await create.getAttribute('href'), FIX_URL);
    assert.equal(await create.getAttribute('target'), '_blank');
    assert.equal(await create.getAttribute('rel'), 'noopener noreferrer');
    const field = page.getByLabel('Stripe API key');
    assert.equal(await field.getAttribute('autocomplete'), 'off');
    assert.equal(await field.getAttribute('spellcheck'), 'false');
    // Surrounding whitespace is trimmed, as the service does.
    await field.fill(`  ${key}\n`);
    await expectText(modal(page).locator('#api-key-check'), 'Restricted test-mode key ending in Good: ready to activate.');
    const activate = page.getByRole('button', { name: 'Activate' });
    const posted = page.waitForRequest((r) => r.method() === 'POST' && r.url().endsWith('/stripe/connection'));
    await activate.click();
    assert.equal(JSON.parse((await posted).postData()).api_key, key, 'the trimmed key is sent');
    // Busy while Stripe (slowed to 150 ms a probe) answers.
    const busy = page.getByRole('button', { name: 'Activating…' });
    assert.equal(await busy.isDisabled(), true);
    assert.equal(await busy.getAttribute('aria-busy'), 'true');
    assert.equal(await field.inputValue(), '', 'the field is cleared on submit');
    await page.locator('atlas-stripe-connect[data-view="connected"]').waitFor();
    await expectText(page.getByRole('heading', { name: 'Stripe is connected' }), 'Stripe is connected');
    await expectText(modal(page).locator('dd.status'), 'Active');
    await expectText(modal(page).locator('dd.key-last4'), 'rk_test_…Good');
    await expectText(modal(page).locator('.summary div:nth-child(3) dd'), 'Restricted key');
    await expectText(modal(page).locator('.summary div:nth-child(2) dd'), 'Test');
    const verified = modal(page).locator('.summary time').first();
    assert.match(await verified.getAttribute('datetime'), /^\d{4}-\d\d-\d\dT/);
    assert.match((await verified.textContent()).trim(), /\d{4}/);
    assert.equal(await modal(page).locator('ul.checklist[aria-label="Permissions"] li[data-access="granted"]').count(), 5);
    await expectText(modal(page).locator('[role="status"]'), 'Connected: Restricted key ending in Good, test mode, Active.');
    assert.equal(await page.evaluate(() => document.querySelector('atlas-stripe-connect').shadowRoot.activeElement?.id), 'connected-heading');
    assert.equal((await t.api('GET')).status, 200, 'the service holds the connection');
  });

  await scenario(context, service, 'a key missing Coupons shows that row missing and the fix link', 'missing-permissions', async ({ page }) => {
    const t = await tenant(service, 'ten_e2e_nocp');
    await openAndWait(page, t, 'setup');
    await page.getByLabel('Stripe API key').fill(secret(makeKey('rk_test_', 'NoCp')));
    await page.getByRole('button', { name: 'Activate' }).click();
    const result = modal(page).locator('.result[data-code="missing_permissions"]');
    await result.waitFor();
    await expectText(result.locator('h4'), 'This key is missing permissions');
    const rows = result.locator('ul.checklist li');
    assert.equal(await rows.count(), 5);
    for (const [resource, access] of [['customers', 'Granted'], ['checkout_sessions', 'Granted'], ['coupons', 'Missing'], ['invoices', 'Granted'], ['webhook_endpoints', 'Granted']]) {
      await expectText(result.locator(`li[data-resource="${resource}"] .access`), access);
    }
    const fix = page.getByRole('link', { name: /Create a key with the missing permissions/ });
    assert.equal(await fix.getAttribute('href'), FIX_URL);
    assert.equal(await fix.getAttribute('rel'), 'noopener noreferrer');
    assert.equal(await fix.getAttribute('target'), '_blank');
    await expectText(modal(page).locator('[role="status"]'), 'This key is missing permissions: Coupons. Nothing was stored.');
    assert.equal((await t.api('GET')).status, 404, 'nothing was stored');
  });

  await scenario(context, service, 'a publishable key is refused in the page, no request sent', 'publishable-refused', async ({ page, apiRequests }) => {
    const t = await tenant(service, 'ten_e2e_pk');
    await openAndWait(page, t, 'setup');
    const stripeBefore = stripe.state.requests.length;
    await expectRefusedInPage(page, apiRequests, `pk_test_${randomAlnum(99)}`, PUBLISHABLE);
    assert.equal(stripe.state.requests.length, stripeBefore, 'nothing reached Stripe');
  });

  await scenario(context, service, 'a live key on a test tenant is refused in the page, no request sent', 'live-key-refused', async ({ page, apiRequests }) => {
    const t = await tenant(service, 'ten_e2e_live');
    await openAndWait(page, t, 'setup');
    await expectRefusedInPage(page, apiRequests, secret(makeKey('rk_live_', 'Good')), TEST_TENANT_LIVE_KEY);
  });

  await scenario(context, service, 'disconnect, after a confirmation, returns to the empty state', 'disconnected', async ({ page, apiRequests }) => {
    const t = await tenant(service, 'ten_e2e_bye');
    const connected = await t.api('POST', '', { api_key: secret(makeKey('rk_test_', 'Good')) });
    assert.equal(connected.status, 201);
    await openAndWait(page, t, 'connected');
    // Cancelling changes nothing.
    await page.getByRole('button', { name: 'Disconnect', exact: true }).click();
    const confirm = page.getByRole('group', { name: 'Disconnect Stripe?' });
    await confirm.waitFor();
    assert.equal(await page.evaluate(() => document.querySelector('atlas-stripe-connect').shadowRoot.activeElement?.textContent), 'Cancel');
    await page.getByRole('button', { name: 'Cancel' }).click();
    assert.equal(await confirm.isVisible(), false);
    assert.ok(!apiRequests.some((r) => r.startsWith('DELETE')), 'Cancel sent nothing');
    // Confirming disconnects.
    await page.getByRole('button', { name: 'Disconnect', exact: true }).click();
    await page.getByRole('button', { name: 'Disconnect Stripe' }).click();
    await page.locator('atlas-stripe-connect[data-view="setup"]').waitFor();
    await expectText(page.getByRole('heading', { name: 'Connect your Stripe account' }), 'Connect your Stripe account');
    assert.equal(await page.getByLabel('Stripe API key').isVisible(), true);
    await expectText(modal(page).locator('[role="status"]'), 'Stripe is disconnected. The stored key was deleted.');
    assert.equal(apiRequests.filter((r) => r.startsWith('DELETE')).length, 1);
    assert.equal((await t.api('GET')).status, 404, 'the service forgot the key');
  });

  await scenario(context, service, 'keyboard: focus stays in the modal, Escape closes it, the dialog is labelled', 'keyboard', async ({ page }) => {
    const t = await tenant(service, 'ten_e2e_keys');
    await openAndWait(page, t, 'setup');
    const dialog = page.getByRole('dialog', { name: 'Stripe' });
    assert.equal(await dialog.getAttribute('aria-modal'), 'true');
    const activeId = () => page.evaluate(() => {
      const host = document.activeElement;
      if (host?.localName !== 'atlas-stripe-connect') return `outside:${host?.localName}`;
      const inner = host.shadowRoot.activeElement;
      return inner?.id || inner?.getAttribute('aria-label') || inner?.textContent?.trim() || inner?.localName;
    });
    assert.equal(await activeId(), 'api-key', 'the paste field has focus on open');
    const seen = new Set();
    for (let i = 0; i < 12; i++) {
      await page.keyboard.press('Tab');
      const id = await activeId();
      assert.ok(!id.startsWith('outside'), `Tab left the modal: ${id}`);
      seen.add(id);
    }
    assert.ok(seen.has('Close') && seen.has('Activate'), `Tab cycles through the modal: ${[...seen].join(', ')}`);
    for (let i = 0; i < 12; i++) {
      await page.keyboard.press('Shift+Tab');
      assert.ok(!(await activeId()).startsWith('outside'), 'Shift+Tab left the modal');
    }
    await page.keyboard.press('Escape');
    await page.locator('atlas-stripe-connect[hidden]').waitFor({ state: 'attached' });
    assert.equal(await page.evaluate(() => document.activeElement?.id), 'open', 'focus returns to the opener');
    await page.keyboard.press('Enter');
    await dialog.waitFor();
    assert.equal(await activeId(), 'api-key');
  });

  await scenario(context, service, 'Stripe unavailable: the API message and a Retry that succeeds', 'stripe-unavailable', async ({ page }) => {
    const t = await tenant(service, 'ten_e2e_down');
    await openAndWait(page, t, 'setup');
    stripe.state.down = true;
    await page.getByLabel('Stripe API key').fill(secret(makeKey('rk_test_', 'Down')));
    await page.getByRole('button', { name: 'Activate' }).click();
    const result = modal(page).locator('.result[data-code="stripe_unavailable"]');
    await result.waitFor();
    await expectText(result.locator('.result-text'), 'Stripe could not be reached or gave no clear answer; nothing was stored. Try again shortly.');
    await expectText(result.locator('.small'), /^Reference: req_/);
    stripe.state.down = false;
    await page.getByRole('button', { name: 'Retry' }).click();
    await page.locator('atlas-stripe-connect[data-view="connected"]').waitFor();
    await expectText(modal(page).locator('dd.key-last4'), 'rk_test_…Down');
  });

  await scenario(context, service, 'a secret key connects with the restricted-key recommendation; Re-verify works', 'secret-key-warning', async ({ page }) => {
    const t = await tenant(service, 'ten_e2e_sk');
    await openAndWait(page, t, 'setup');
    await page.getByLabel('Stripe API key').fill(secret(makeKey('sk_test_', 'Good')));
    await page.getByRole('button', { name: 'Activate' }).click();
    await page.locator('atlas-stripe-connect[data-view="connected"]').waitFor();
    await expectText(modal(page).locator('[data-warning="secret_key_full_access"]'), /A restricted key with only the five permissions Atlas needs is safer/);
    await page.getByRole('button', { name: 'Re-verify' }).click();
    await expectText(modal(page).locator('.action-result'), 'Re-verified with Stripe: Active.');
  });

  await scenario(context, service, 'a probe Stripe answers "Unrecognized request URL" proves nothing: unavailable, nothing stored', 'unrecognized-url', async ({ page }) => {
    const t = await tenant(service, 'ten_e2e_unknown');
    await openAndWait(page, t, 'setup');
    stripe.state.unknownProbes = new Set(['customers']);
    try {
      const before = stripe.state.requests.length;
      await page.getByLabel('Stripe API key').fill(secret(makeKey('rk_test_', 'Good')));
      await page.getByRole('button', { name: 'Activate' }).click();
      const result = modal(page).locator('.result[data-code="stripe_unavailable"]');
      await result.waitFor();
      await expectText(result.locator('.result-text'), 'Stripe could not be reached or gave no clear answer; nothing was stored. Try again shortly.');
      const sent = stripe.state.requests.slice(before);
      assert.ok(sent.some((r) => r.path.startsWith('/v1/customers/')), 'the Customers probe was sent');
      assert.ok(!sent.some((r) => r.path === '/v1/webhook_endpoints'), 'no endpoint registered for an unproven key');
      assert.equal((await t.api('GET')).status, 404, 'nothing was stored');
    } finally {
      stripe.state.unknownProbes = new Set();
    }
  });

  await scenario(context, service, 'a key Stripe rejects shows the API message', 'key-rejected', async ({ page }) => {
    const t = await tenant(service, 'ten_e2e_revk');
    await openAndWait(page, t, 'setup');
    await page.getByLabel('Stripe API key').fill(secret(makeKey('rk_test_', 'Revk')));
    await page.getByRole('button', { name: 'Activate' }).click();
    const result = modal(page).locator('.result[data-code="key_rejected"]');
    await result.waitFor();
    await expectText(result.locator('.result-text'), 'Stripe does not accept this key: it is invalid, or was rolled or deleted. Copy a current key from the Stripe dashboard.');
    assert.equal(await result.getByRole('button', { name: 'Retry' }).isVisible(), false, 'no retry for a rejected key');
  });
}

await main();
