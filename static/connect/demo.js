// The demo host at /connect/stripe: a stand-in for Atlas's integrations page that opens
// <atlas-stripe-connect> as a modal.
//
// For a local demo the tenant, its mode and a tenant token arrive in the URL fragment
// (`#tenant=ten_123&mode=test&token=…`, printed by `atlas-stripe demo-url`). The fragment
// never reaches a server; it is read once and removed from the address bar and the history
// entry. A token in the fragment is honoured on loopback hosts only: elsewhere a crafted
// link could otherwise have a tenant paste their Stripe key into someone else's tenant.

import './atlas-stripe-connect.js';

const LOOPBACK = new Set(['localhost', '127.0.0.1', '[::1]']);

function readFragment() {
  if (!location.hash) return null;
  const params = new URLSearchParams(location.hash.slice(1));
  history.replaceState(history.state, '', location.pathname + location.search);
  return {
    tenant: params.get('tenant'),
    mode: params.get('mode'),
    token: params.get('token'),
  };
}

const modal = document.getElementById('modal');
const page = document.getElementById('page');
const opener = document.getElementById('open');
const state = document.getElementById('integration-state');

const fragment = readFragment();
if (fragment) {
  if (fragment.tenant) modal.setAttribute('tenant-id', fragment.tenant);
  if (fragment.mode) modal.setAttribute('mode', fragment.mode);
  if (fragment.token && LOOPBACK.has(location.hostname)) modal.token = fragment.token;
}

function open() {
  page.inert = true;
  modal.hidden = false;
  modal.focus();
}

function close() {
  modal.hidden = true;
  page.inert = false;
  opener.focus();
}

opener.addEventListener('click', open);
modal.addEventListener('atlas-stripe-connect:close', close);
modal.addEventListener('atlas-stripe-connect:change', (event) => {
  const connection = event.detail.connection;
  state.textContent = connection ? `Connected (${connection.mode} mode, …${connection.key_last4})` : 'Not connected';
});

open();
