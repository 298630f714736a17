// Checks a pasted Stripe key in the browser, before any request, with the same rules and
// the same sentences as the service (src/domain/stripe_key.rs, src/http/error.rs). A Rust
// test (src/http/connect_page.rs) fails when a sentence here drifts from the API's.

/** The resources Atlas needs write access to, in the API's order. */
export const RESOURCES = Object.freeze([
  { id: 'customers', label: 'Customers', scope: 'rak_customer_write' },
  { id: 'checkout_sessions', label: 'Checkout Sessions', scope: 'rak_checkout_session_write' },
  { id: 'coupons', label: 'Coupons', scope: 'rak_coupon_write' },
  { id: 'invoices', label: 'Invoices', scope: 'rak_invoice_write' },
  { id: 'webhook_endpoints', label: 'Webhook Endpoints', scope: 'rak_webhook_write' },
]);

export const MESSAGES = Object.freeze({
  empty: 'The key is empty: paste a restricted key (rk_…) or a secret key (sk_…).',
  publishable: 'Paste a secret or restricted key, not the publishable key (pk_…).',
  webhookSecret:
    'This is a webhook signing secret (whsec_…); paste a secret or restricted API key instead.',
  organization:
    'Organisation API keys (sk_org…) are not supported: they cannot be mode-checked and need a Stripe-Context header. Paste an account\'s restricted or secret key.',
  notAKey:
    'This is not a Stripe API key: it must start with rk_test_, rk_live_, sk_test_ or sk_live_.',
  badCharacters:
    'The key contains characters Stripe keys never have (only letters and digits follow the prefix): copy it again from the Stripe dashboard.',
  badLength:
    'The key is too short or too long to be a Stripe key: copy it again, whole, from the Stripe dashboard.',
});

/** The API's `mode_mismatch` sentence, by the tenant's mode. */
export const MODE_MISMATCH = Object.freeze({
  test: 'This tenant is in test mode; the pasted key is a live key.',
  live: 'This tenant is in live mode; the pasted key is a test key.',
});

const PREFIXES = [
  ['sk_test_', 'secret', 'test'],
  ['sk_live_', 'secret', 'live'],
  ['rk_test_', 'restricted', 'test'],
  ['rk_live_', 'restricted', 'live'],
];

const BODY = /^[A-Za-z0-9]*$/;
const BODY_MIN = 10;
const BODY_MAX = 247;

// Rust's str::trim: Unicode White_Space at both ends (not quite JavaScript's trim()).
const SPACE = '[\\t-\\r \\u0085\\u00A0\\u1680\\u2000-\\u200A\\u2028\\u2029\\u202F\\u205F\\u3000]';
const EDGES = new RegExp(`^${SPACE}+|${SPACE}+$`, 'gu');

/** Tenant ids as the service accepts them (src/domain/tenant.rs). */
export function isTenantId(raw) {
  return typeof raw === 'string' && raw.length <= 64 && /^[A-Za-z0-9][A-Za-z0-9_.-]*$/.test(raw);
}

export function isMode(raw) {
  return raw === 'test' || raw === 'live';
}

/** Events: Read, not required, lets missed events be recovered from Stripe's event log. */
const EVENTS_READ_SCOPE = 'rak_event_read';

/**
 * Stripe's create-restricted-key page, pre-filled with a name, exactly the five permissions,
 * and Events: Read.
 */
export function createKeyUrl(mode) {
  const segment = mode === 'live' ? '' : 'test/';
  const scopes = [...RESOURCES.map((r) => r.scope), EVENTS_READ_SCOPE];
  const permissions = scopes.map((scope) => `&permissions[]=${scope}`).join('');
  return `https://dashboard.stripe.com/${segment}apikeys/create?name=Atlas${permissions}`;
}

/**
 * Checks a pasted key in the order the service does (format, then mode), so the sentence
 * shown is the one the API would answer with.
 *
 * @returns {{ok: true, kind: string, mode: string, last4: string}
 *         | {ok: false, code: string, message: string}}
 */
export function checkKey(pasted, tenantMode) {
  const key = normaliseKey(pasted);
  const refuse = (code, message) => ({ ok: false, code, message });
  if (key === '') return refuse('invalid_api_key_format', MESSAGES.empty);
  if (key.startsWith('pk_')) return refuse('publishable_key_not_accepted', MESSAGES.publishable);
  if (key.startsWith('whsec_')) return refuse('webhook_secret_not_accepted', MESSAGES.webhookSecret);
  if (key.startsWith('sk_org') || key.startsWith('rk_org')) {
    return refuse('organization_key_not_supported', MESSAGES.organization);
  }
  const match = PREFIXES.find(([prefix]) => key.startsWith(prefix));
  if (!match) return refuse('invalid_api_key_format', MESSAGES.notAKey);
  const [prefix, kind, mode] = match;
  const body = key.slice(prefix.length);
  if (!BODY.test(body)) return refuse('invalid_api_key_format', MESSAGES.badCharacters);
  if (body.length < BODY_MIN || body.length > BODY_MAX) {
    return refuse('invalid_api_key_format', MESSAGES.badLength);
  }
  if (isMode(tenantMode) && mode !== tenantMode) {
    return refuse('mode_mismatch', MODE_MISMATCH[tenantMode]);
  }
  return { ok: true, kind, mode, last4: key.slice(-4) };
}

/**
 * While the key is still being typed: the refusals no further typing can fix (a
 * publishable key, a webhook secret, an organisation key, a key of the other mode), or
 * null. Shown at once; the rest waits for a paste, a blur or Activate.
 */
export function decisiveRefusal(pasted, tenantMode) {
  const key = normaliseKey(pasted);
  const result = checkKey(key, tenantMode);
  if (!result.ok && result.code !== 'invalid_api_key_format') return result;
  const match = PREFIXES.find(([prefix]) => key.startsWith(prefix));
  if (match && isMode(tenantMode) && match[2] !== tenantMode) {
    return { ok: false, code: 'mode_mismatch', message: MODE_MISMATCH[tenantMode] };
  }
  return null;
}

/** The trimmed key, as the service will see it. */
export function normaliseKey(pasted) {
  return String(pasted ?? '').replace(EDGES, '');
}
