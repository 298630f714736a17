// A stand-in for api.stripe.com that answers the five permission probes the service sends
// (DESIGN.md, "Probe write access") in Stripe's own shapes, deciding by the key's last four
// characters:
//
//   …Good   every resource granted (404 resource_missing, as Stripe answers an update of a
//           nonexistent object the key may write)
//   …NoCp   Coupons denied (403 "does not have the required permissions"), the rest granted
//   …Down   503 api_error while `down` is set (the service retries, then answers 502)
//   …Revk   401 "Invalid API Key provided" on every probe
//
// Any other suffix is treated like …Good. Probes answer after `delayMs`, so a test can see
// the page's busy state. Webhook endpoints (create, retrieve, delete) are kept in memory,
// as Stripe keeps them on the account, with the signing secret returned once at creation.
//
// A path Stripe does not know gets Stripe's own answer: 404 `invalid_request_error`, no
// `code`, "Unrecognized request URL (…)". The service must never read that as a granted
// permission. `state.unknownProbes` (a set of resource names) makes those probe paths
// unknown, as if the service's probe path had drifted off Stripe's API.

import http from 'node:http';
import crypto from 'node:crypto';

const PROBES = [
  { resource: 'customers', pattern: /^\/v1\/customers\/(cus_[A-Za-z0-9_]+)$/, noun: 'customer' },
  { resource: 'checkout_sessions', pattern: /^\/v1\/checkout\/sessions\/(cs_[A-Za-z0-9_]+)\/expire$/, noun: 'checkout.session' },
  { resource: 'coupons', pattern: /^\/v1\/coupons\/([A-Za-z0-9_]+)$/, noun: 'coupon' },
  { resource: 'invoices', pattern: /^\/v1\/invoices\/(in_[A-Za-z0-9_]+)$/, noun: 'invoice' },
  { resource: 'webhook_endpoints', pattern: /^\/v1\/webhook_endpoints\/(we_[A-Za-z0-9_]+)$/, noun: 'webhook_endpoint' },
];

const DENIED = { NoCp: new Set(['coupons']) };

function masked(key) {
  const prefix = key.match(/^(rk|sk)_(test|live)_/)?.[0] ?? '';
  return `${prefix}${'*'.repeat(Math.max(0, key.length - prefix.length - 4))}${key.slice(-4)}`;
}

export async function startFakeStripe({ delayMs = 0 } = {}) {
  const state = { down: true, delayMs, requests: [], endpoints: new Map(), unknownProbes: new Set() };
  const server = http.createServer((req, res) => {
    const chunks = [];
    req.on('data', (chunk) => chunks.push(chunk));
    req.on('end', () => {
      const form = new URLSearchParams(Buffer.concat(chunks).toString('utf8'));
      const key = (req.headers.authorization ?? '').replace(/^Bearer /, '');
      const last4 = key.slice(-4);
      const path = new URL(req.url, 'http://stripe.invalid').pathname;
      state.requests.push({ method: req.method, path, last4 });
      const send = (status, body) => {
        const text = JSON.stringify(body);
        setTimeout(() => {
          res.writeHead(status, {
            'Content-Type': 'application/json',
            'Content-Length': Buffer.byteLength(text),
            'Request-Id': `req_${crypto.randomBytes(7).toString('hex')}`,
            'Stripe-Version': req.headers['stripe-version'] ?? '2023-08-16',
          });
          res.end(text);
        }, state.delayMs);
      };
      if (path === '/v1/webhook_endpoints' && req.method === 'POST') {
        const id = `we_${crypto.randomBytes(8).toString('hex')}`;
        const endpoint = { id, object: 'webhook_endpoint', url: form.get('url'), status: 'enabled',
          enabled_events: form.getAll('enabled_events[]'), livemode: false, metadata: {} };
        state.endpoints.set(id, endpoint);
        send(200, { ...endpoint, secret: `whsec_${crypto.randomBytes(16).toString('hex')}` });
        return;
      }
      const endpointPath = path.match(/^\/v1\/webhook_endpoints\/(we_[A-Za-z0-9_]+)$/);
      if (endpointPath && (req.method === 'GET' || req.method === 'DELETE')) {
        const endpoint = state.endpoints.get(endpointPath[1]);
        if (!endpoint) {
          send(404, { error: { type: 'invalid_request_error', code: 'resource_missing',
            message: `No such webhook endpoint: '${endpointPath[1]}'`, param: 'id' } });
        } else if (req.method === 'DELETE') {
          state.endpoints.delete(endpoint.id);
          send(200, { id: endpoint.id, object: 'webhook_endpoint', deleted: true });
        } else {
          send(200, endpoint);
        }
        return;
      }
      const probe = req.method === 'POST'
        ? PROBES.find((p) => p.pattern.test(path) && !state.unknownProbes.has(p.resource))
        : undefined;
      if (!probe) {
        send(404, {
          error: {
            type: 'invalid_request_error',
            message: `Unrecognized request URL (${req.method}: ${path}). Please see https://stripe.com/docs or we can help at https://support.stripe.com/.`,
          },
        });
        return;
      }
      if (last4 === 'Revk') {
        send(401, { error: { type: 'invalid_request_error', message: `Invalid API Key provided: ${masked(key)}` } });
        return;
      }
      if (last4 === 'Down' && state.down) {
        send(503, { error: { type: 'api_error', message: 'Stripe is temporarily unavailable.' } });
        return;
      }
      if (DENIED[last4]?.has(probe.resource)) {
        send(403, {
          error: {
            type: 'invalid_request_error',
            message: `The provided key '${masked(key)}' does not have the required permissions for this endpoint on account 'acct_1'.`,
          },
        });
        return;
      }
      const id = path.match(probe.pattern)[1];
      send(404, {
        error: {
          type: 'invalid_request_error',
          code: 'resource_missing',
          message: `No such ${probe.noun}: '${id}'`,
          param: 'id',
        },
      });
    });
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    url: `http://127.0.0.1:${server.address().port}`,
    state,
    close: () => new Promise((resolve) => server.close(resolve)),
  };
}
