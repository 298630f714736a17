// Unit tests of the page's instant key checks (static/connect/key-check.js), mirroring the
// service's own (src/domain/stripe_key.rs). Run by scripts/e2e with `node --test`.

import assert from 'node:assert/strict';
import test from 'node:test';

import {
  MESSAGES,
  MODE_MISMATCH,
  checkKey,
  createKeyUrl,
  decisiveRefusal,
  isTenantId,
} from '../../static/connect/key-check.js';

const tail = (length) => 'aB3'.repeat(Math.ceil(length / 3)).slice(0, length);

test('accepts the four prefixes, trimmed, and reports kind, mode and last 4', () => {
  for (const [prefix, kind, mode] of [
    ['sk_test_', 'secret', 'test'],
    ['sk_live_', 'secret', 'live'],
    ['rk_test_', 'restricted', 'test'],
    ['rk_live_', 'restricted', 'live'],
  ]) {
    const key = `${prefix}${tail(95)}Kgd1`;
    assert.deepEqual(checkKey(`  ${key}\n\u00a0`, mode), { ok: true, kind, mode, last4: 'Kgd1' });
    assert.deepEqual(checkKey(key, null), { ok: true, kind, mode, last4: 'Kgd1' });
  }
});

test('body length bounds are 10 to 247', () => {
  assert.equal(checkKey(`rk_test_${tail(10)}`, 'test').ok, true);
  assert.equal(checkKey(`rk_test_${tail(247)}`, 'test').ok, true);
  assert.equal(checkKey(`rk_test_${tail(9)}`, 'test').message, MESSAGES.badLength);
  assert.equal(checkKey(`rk_test_${tail(248)}`, 'test').message, MESSAGES.badLength);
});

test('refuses other kinds with the API code and sentence', () => {
  const cases = [
    [`pk_test_${tail(99)}`, 'publishable_key_not_accepted', MESSAGES.publishable],
    [`pk_live_${tail(99)}`, 'publishable_key_not_accepted', MESSAGES.publishable],
    [`whsec_${tail(32)}`, 'webhook_secret_not_accepted', MESSAGES.webhookSecret],
    [`sk_org_live_${tail(99)}`, 'organization_key_not_supported', MESSAGES.organization],
    [`rk_org_live_${tail(99)}`, 'organization_key_not_supported', MESSAGES.organization],
    [`sk_test_${tail(40)}-x`, 'invalid_api_key_format', MESSAGES.badCharacters],
    [`sk_test_${tail(20)} ${tail(20)}`, 'invalid_api_key_format', MESSAGES.badCharacters],
    [`sk_prod_${tail(40)}`, 'invalid_api_key_format', MESSAGES.notAKey],
    [`SK_TEST_${tail(40)}`, 'invalid_api_key_format', MESSAGES.notAKey],
    ['', 'invalid_api_key_format', MESSAGES.empty],
    ['   ', 'invalid_api_key_format', MESSAGES.empty],
    ['sk_test_é', 'invalid_api_key_format', MESSAGES.badCharacters],
    // Rust's trim does not remove a byte-order mark; JavaScript's would.
    [`\ufeffrk_test_${tail(40)}`, 'invalid_api_key_format', MESSAGES.notAKey],
  ];
  for (const [raw, code, message] of cases) {
    const result = checkKey(raw, 'test');
    assert.deepEqual([result.ok, result.code, result.message], [false, code, message], JSON.stringify(raw));
    if (raw.trim()) assert.ok(!result.message.includes(raw.trim()), 'the sentence never echoes the input');
  }
});

test('mode mismatch comes after the format, as in the service', () => {
  assert.equal(checkKey(`rk_live_${tail(99)}`, 'test').message, MODE_MISMATCH.test);
  assert.equal(checkKey(`sk_test_${tail(99)}`, 'live').message, MODE_MISMATCH.live);
  assert.equal(checkKey(`rk_live_${tail(3)}`, 'test').message, MESSAGES.badLength);
});

test('while typing, only refusals more typing cannot fix are decisive', () => {
  assert.equal(decisiveRefusal('pk_', 'test').code, 'publishable_key_not_accepted');
  assert.equal(decisiveRefusal('whsec_', 'test').code, 'webhook_secret_not_accepted');
  assert.equal(decisiveRefusal('rk_live_', 'test').message, MODE_MISMATCH.test);
  assert.equal(decisiveRefusal('rk_live_ab', 'live'), null);
  assert.equal(decisiveRefusal('rk_te', 'test'), null);
  assert.equal(decisiveRefusal(`rk_test_${tail(3)}`, 'test'), null);
});

test('the create-key link names exactly the five permissions, per mode', () => {
  const scopes = '&permissions[]=rak_customer_write&permissions[]=rak_checkout_session_write' +
    '&permissions[]=rak_coupon_write&permissions[]=rak_invoice_write&permissions[]=rak_webhook_write&permissions[]=rak_event_read';
  assert.equal(createKeyUrl('test'), `https://dashboard.stripe.com/test/apikeys/create?name=Atlas${scopes}`);
  assert.equal(createKeyUrl('live'), `https://dashboard.stripe.com/apikeys/create?name=Atlas${scopes}`);
});

test('tenant ids as the service accepts them', () => {
  assert.ok(isTenantId('ten_123'));
  assert.ok(isTenantId('a'.repeat(64)));
  for (const bad of ['', 'a'.repeat(65), 'ten 1', 'ten/1', '../x', '.hidden', '-x', 'tén']) {
    assert.equal(isTenantId(bad), false, bad);
  }
});
