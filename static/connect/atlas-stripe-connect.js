// <atlas-stripe-connect>: the integrations modal that connects a tenant's Stripe account.
//
//   <script type="module" src="/connect/stripe/assets/atlas-stripe-connect.js"></script>
//   <atlas-stripe-connect api-base="https://stripe-connect.atlas.example" tenant-id="ten_123"
//                         mode="test"></atlas-stripe-connect>
//   document.querySelector('atlas-stripe-connect').token = tenantToken;
//
// Attributes: `api-base` (empty: this origin), `tenant-id`, `mode` (`test` or `live`, what the
// Atlas app knows; the service's answers win when they say otherwise). The tenant token is a
// write-only property; a `token` attribute is accepted too and removed from the DOM at once.
// The token and the pasted key are never logged, never stored (no Web Storage, no cookies,
// no URL), and the key field is cleared as soon as Activate reads it.
//
// Events (bubbling, composed): `atlas-stripe-connect:close` when the tenant closes the modal
// (Escape or the close button; the host hides the element), `atlas-stripe-connect:change`
// with `detail.connection` (the summary, or null once disconnected).
//
// No innerHTML anywhere: the page runs under Trusted Types, and nothing the service or the
// tenant sends is ever parsed as markup.

import { ConnectApi } from './api.js';
import {
  RESOURCES,
  checkKey,
  createKeyUrl,
  decisiveRefusal,
  isMode,
  isTenantId,
  normaliseKey,
} from './key-check.js';

const STYLESHEET = new URL('./connect.css', import.meta.url).href;
/** How long a pasted key is kept in memory for Retry after an inconclusive answer. */
const PENDING_KEY_TTL_MS = 5 * 60 * 1000;
const STRIPE_DASHBOARD = 'https://dashboard.stripe.com/';

const STATUS_LABELS = { active: 'Active', needs_attention: 'Needs attention', revoked: 'Revoked' };
const KEY_TYPE_LABELS = { restricted: 'Restricted key', secret: 'Secret key' };
const WARNING_TEXT = {
  secret_key_full_access:
    'This is a secret key: it can do anything on your Stripe account. A restricted key with only the five permissions Atlas needs is safer. Create one and paste it here to replace this key.',
};

/** Builds an element. `text` sets textContent; `on…` adds a listener; true/false toggle attributes. */
function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (value === false || value === null || value === undefined) continue;
    if (name === 'text') el.textContent = value;
    else if (name.startsWith('on') && typeof value === 'function') el.addEventListener(name.slice(2), value);
    else el.setAttribute(name, value === true ? '' : String(value));
  }
  el.append(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
  return el;
}

function modeLabel(mode) {
  return mode === 'live' ? 'Live mode' : mode === 'test' ? 'Test mode' : 'Mode unknown';
}

function formatTime(iso) {
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return String(iso ?? '');
  return new Intl.DateTimeFormat(undefined, { dateStyle: 'medium', timeStyle: 'short' }).format(date);
}

function externalLink(href, text, extra = {}) {
  return h('a', { href, target: '_blank', rel: 'noopener noreferrer', ...extra }, text,
    h('span', { class: 'visually-hidden', text: ' (opens in a new tab)' }));
}

const FOCUSABLE = 'a[href], button:not([disabled]), input:not([disabled]), [tabindex]:not([tabindex="-1"])';

export class AtlasStripeConnect extends HTMLElement {
  static observedAttributes = ['api-base', 'tenant-id', 'mode', 'token'];

  #token = null;
  #apiBase = '';
  #tenantId = null;
  /** The tenant's mode: from the host, corrected by the service's answers. */
  #mode = null;
  #ui = null;
  /** 'idle' | 'loading' | 'problem' | 'setup' | 'connected' */
  #view = 'idle';
  #summary = null;
  #replacing = false;
  #confirming = false;
  #busy = false;
  /** A key kept in memory only while a Retry can use it. */
  #pendingKey = null;
  #pendingTimer = 0;
  #countdownTimer = 0;
  #loadQueued = false;
  #generation = 0;
  #touched = false;
  #onDocumentFocus = (event) => this.#keepFocus(event);

  constructor() {
    super();
    this.attachShadow({ mode: 'open' });
  }

  /** The tenant token, from the embedding app. Write-only. */
  set token(value) {
    this.#token = value ? String(value) : null;
    this.#scheduleLoad();
  }

  get tenantId() {
    return this.#tenantId;
  }

  set tenantId(value) {
    this.setAttribute('tenant-id', value);
  }

  get mode() {
    return this.#mode;
  }

  set mode(value) {
    this.setAttribute('mode', value);
  }

  get apiBase() {
    return this.#apiBase;
  }

  set apiBase(value) {
    this.setAttribute('api-base', value);
  }

  attributeChangedCallback(name, _old, value) {
    switch (name) {
      case 'token':
        if (value !== null) {
          this.#token = value || null;
          this.removeAttribute('token');
        }
        break;
      case 'api-base':
        this.#apiBase = value ?? '';
        break;
      case 'tenant-id':
        this.#tenantId = value;
        break;
      case 'mode':
        this.#setMode(isMode(value) ? value : null);
        return;
    }
    this.#scheduleLoad();
  }

  connectedCallback() {
    if (!this.#ui) this.#build();
    document.addEventListener('focusin', this.#onDocumentFocus);
    this.#syncHeader();
    this.#scheduleLoad();
  }

  disconnectedCallback() {
    document.removeEventListener('focusin', this.#onDocumentFocus);
    this.#forgetPendingKey();
    clearInterval(this.#countdownTimer);
  }

  /** Moves focus into the modal: the host calls this after showing it. */
  focus() {
    this.#focusStart();
  }

  // ---------------------------------------------------------------- building the DOM

  #build() {
    const ui = {};
    ui.live = h('p', { class: 'visually-hidden', role: 'status', 'aria-live': 'polite', 'aria-atomic': 'true' });
    ui.modeBadge = h('span', { class: 'mode-badge' });
    ui.tenant = h('code');
    ui.close = h('button', { type: 'button', class: 'icon-button', 'aria-label': 'Close', onclick: () => this.#requestClose() }, '×');

    // Loading and problems.
    ui.loading = h('section', { class: 'view', 'aria-busy': 'true' }, h('p', { class: 'muted', text: 'Loading the Stripe connection…' }));
    ui.problemText = h('p');
    ui.problemRetry = h('button', { type: 'button', class: 'secondary', onclick: () => this.#load() }, 'Retry');
    ui.problem = h('section', { class: 'view' }, h('div', { class: 'notice error', role: 'alert' }, ui.problemText), ui.problemRetry);

    // The connected view.
    ui.connectedHeading = h('h3', { id: 'connected-heading', tabindex: '-1' }, 'Stripe is connected');
    ui.status = h('dd', { class: 'status' });
    ui.summaryMode = h('dd');
    ui.keyType = h('dd');
    ui.keyLast4 = h('dd', { class: 'key-last4' });
    ui.verifiedAt = h('time');
    ui.connectedAt = h('time');
    ui.warnings = h('div', { class: 'warnings' });
    ui.summaryChecklist = h('ul', { class: 'checklist', 'aria-label': 'Permissions' });
    ui.summaryFix = h('p', { class: 'fix' });
    ui.verify = h('button', { type: 'button', class: 'secondary', onclick: () => this.#verify() }, 'Re-verify');
    ui.replace = h('button', { type: 'button', class: 'secondary', 'aria-expanded': 'false', 'aria-controls': 'setup', onclick: () => this.#toggleReplace() }, 'Replace key');
    ui.disconnect = h('button', { type: 'button', class: 'danger', onclick: () => this.#askDisconnect() }, 'Disconnect');
    ui.actionResult = h('div', { class: 'action-result', tabindex: '-1' });
    ui.actions = h('div', { class: 'actions' }, ui.verify, ui.replace, ui.disconnect);
    ui.confirmCancel = h('button', { type: 'button', class: 'secondary', onclick: () => this.#cancelDisconnect() }, 'Cancel');
    ui.confirmYes = h('button', { type: 'button', class: 'danger', onclick: () => this.#disconnect() }, 'Disconnect Stripe');
    ui.confirm = h('div', { class: 'confirm', role: 'group', 'aria-labelledby': 'confirm-heading', 'aria-describedby': 'confirm-text', hidden: true },
      h('h4', { id: 'confirm-heading', text: 'Disconnect Stripe?' }),
      h('p', { id: 'confirm-text', text: 'Atlas will no longer be able to charge through this Stripe account, and the stored key is deleted. You can connect again at any time.' }),
      h('div', { class: 'actions' }, ui.confirmCancel, ui.confirmYes));
    ui.connected = h('section', { class: 'view', 'aria-labelledby': 'connected-heading' },
      ui.connectedHeading,
      h('dl', { class: 'summary' },
        h('div', {}, h('dt', { text: 'Status' }), ui.status),
        h('div', {}, h('dt', { text: 'Mode' }), ui.summaryMode),
        h('div', {}, h('dt', { text: 'Key type' }), ui.keyType),
        h('div', {}, h('dt', { text: 'Key' }), ui.keyLast4),
        h('div', {}, h('dt', { text: 'Verified' }), h('dd', {}, ui.verifiedAt)),
        h('div', {}, h('dt', { text: 'Connected' }), h('dd', {}, ui.connectedAt))),
      ui.warnings,
      ui.summaryChecklist,
      ui.summaryFix,
      ui.actions,
      ui.confirm,
      ui.actionResult);

    // Creating and pasting a key.
    ui.setupHeading = h('h3', { id: 'setup-heading', tabindex: '-1' }, 'Connect your Stripe account');
    ui.createLinks = h('p', { class: 'create-links' });
    ui.keyInput = h('input', {
      id: 'api-key', type: 'text', class: 'masked', autocomplete: 'off', placeholder: 'Paste the key', autocapitalize: 'off',
      autocorrect: 'off', spellcheck: 'false', 'data-1p-ignore': true, 'data-lpignore': 'true',
      'data-form-type': 'other', 'aria-describedby': 'api-key-hint api-key-check', 'aria-invalid': 'false',
      oninput: (e) => this.#onKeyInput(e), onblur: () => this.#onKeyBlur(),
    });
    ui.showKey = h('button', { type: 'button', class: 'secondary small', 'aria-pressed': 'false', 'aria-controls': 'api-key', onclick: () => this.#toggleShowKey() }, 'Show');
    ui.keyHint = h('p', { id: 'api-key-hint', class: 'hint' });
    ui.keyCheck = h('p', { id: 'api-key-check', class: 'field-check' });
    ui.activate = h('button', { type: 'submit', class: 'primary' }, 'Activate');
    ui.form = h('form', { novalidate: true, 'aria-labelledby': 'step-paste', onsubmit: (e) => this.#onSubmit(e) },
      h('label', { for: 'api-key', text: 'Stripe API key' }),
      h('div', { class: 'field-row' }, ui.keyInput, ui.showKey),
      ui.keyHint,
      ui.keyCheck,
      h('div', { class: 'actions' }, ui.activate));
    ui.resultTitle = h('h4', { id: 'result-title' });
    ui.resultText = h('p', { class: 'result-text' });
    ui.resultChecklist = h('ul', { class: 'checklist', 'aria-label': 'Permissions of the pasted key' });
    ui.resultFix = h('p', { class: 'fix' });
    ui.resultRef = h('p', { class: 'muted small' });
    ui.resultRetry = h('button', { type: 'button', class: 'secondary', onclick: () => this.#retryConnect() }, 'Retry');
    ui.result = h('div', { class: 'result', tabindex: '-1', 'aria-labelledby': 'result-title', hidden: true },
      ui.resultTitle, ui.resultText, ui.resultChecklist, ui.resultFix, ui.resultRef, ui.resultRetry);
    ui.setup = h('section', { id: 'setup', class: 'view', 'aria-labelledby': 'setup-heading' },
      ui.setupHeading,
      h('ol', { class: 'steps' },
        h('li', {},
          h('h4', { id: 'step-create', text: 'Create a restricted key in Stripe' }),
          h('p', { text: 'Stripe opens with a new key already named Atlas and limited to exactly what Atlas needs: write access to Customers, Checkout Sessions, Coupons, Invoices and Webhook Endpoints. Click Create key, then copy the key.' }),
          ui.createLinks,
          h('p', { class: 'note', text: 'A secret key (sk_…) also works, but it can do anything on your Stripe account; a restricted key is recommended.' })),
        h('li', {},
          h('h4', { id: 'step-paste', text: 'Paste it here and activate' }),
          ui.form)),
      ui.result);

    ui.title = h('h2', { id: 'title', tabindex: '-1' }, 'Stripe');
    ui.dialog = h('div', { class: 'modal', role: 'dialog', 'aria-modal': 'true', 'aria-labelledby': 'title', 'aria-describedby': 'subtitle', onkeydown: (e) => this.#onKeydown(e) },
      h('header', {},
        h('div', { class: 'title-row' }, ui.title, ui.modeBadge, ui.close),
        h('p', { id: 'subtitle', class: 'muted' }, 'Charge your customers through your own Stripe account.'),
        h('p', { class: 'muted small tenant' }, 'Tenant ', ui.tenant)),
      h('div', { class: 'body' }, ui.loading, ui.problem, ui.connected, ui.setup),
      ui.live);

    this.shadowRoot.append(h('link', { rel: 'stylesheet', href: STYLESHEET }), ui.dialog);
    this.#ui = ui;
    this.#render();
  }

  // ---------------------------------------------------------------- state → DOM

  #setMode(mode) {
    this.#mode = mode;
    if (this.#ui) this.#syncHeader();
  }

  #syncHeader() {
    const ui = this.#ui;
    const mode = this.#mode;
    ui.modeBadge.textContent = modeLabel(mode);
    ui.modeBadge.dataset.mode = mode ?? 'unknown';
    this.dataset.mode = mode ?? 'unknown';
    ui.tenant.textContent = this.#tenantId ?? '(none)';
    ui.createLinks.replaceChildren(
      ...(isMode(mode) ? [mode] : ['test', 'live']).map((m) =>
        externalLink(createKeyUrl(m), isMode(mode) ? 'Create the key in Stripe' : `Create a ${m}-mode key in Stripe`,
          { class: 'button primary-outline', 'data-mode': m })));
    ui.keyHint.textContent = isMode(mode)
      ? `A ${mode}-mode key starts with rk_${mode}_ (or sk_${mode}_). It is sent once to Atlas, stored encrypted, and never shown again.`
      : 'A key starts with rk_ (or sk_). It is sent once to Atlas, stored encrypted, and never shown again.';
  }

  #render() {
    const ui = this.#ui;
    const view = this.#view;
    ui.loading.hidden = view !== 'loading' && view !== 'idle';
    ui.problem.hidden = view !== 'problem';
    ui.connected.hidden = view !== 'connected';
    ui.setup.hidden = !(view === 'setup' || (view === 'connected' && this.#replacing));
    ui.setupHeading.textContent = view === 'connected' ? 'Replace the key' : 'Connect your Stripe account';
    ui.replace.setAttribute('aria-expanded', String(view === 'connected' && this.#replacing));
    ui.replace.textContent = this.#replacing ? 'Keep this key' : 'Replace key';
    ui.actions.hidden = this.#confirming;
    ui.confirm.hidden = !this.#confirming;
    this.dataset.view = view;
  }

  #show(view) {
    this.#view = view;
    if (view !== 'connected') {
      this.#replacing = false;
      this.#confirming = false;
    }
    this.#render();
  }

  #announce(text) {
    const live = this.#ui.live;
    live.textContent = '';
    // A fresh text node after a tick, so the same sentence twice is announced twice.
    setTimeout(() => {
      live.textContent = text;
    }, 50);
  }

  // ---------------------------------------------------------------- loading

  #scheduleLoad() {
    if (!this.#ui || !this.isConnected || this.#loadQueued) return;
    this.#loadQueued = true;
    queueMicrotask(() => {
      this.#loadQueued = false;
      this.#load();
    });
  }

  #api() {
    return new ConnectApi({ base: this.#apiBase, tenantId: this.#tenantId, token: this.#token });
  }

  #problem(message, { retry = false } = {}) {
    this.#ui.problemText.textContent = message;
    this.#ui.problemRetry.hidden = !retry;
    this.#show('problem');
    this.#announce(message);
  }

  async #load() {
    const generation = ++this.#generation;
    this.#syncHeader();
    if (!this.#tenantId || !this.#token) {
      this.#problem('This page needs a tenant and a tenant token from the Atlas app. Open the Stripe integration from the Atlas integrations page (for a local demo: atlas-stripe demo-url).');
      return;
    }
    if (!isTenantId(this.#tenantId)) {
      this.#problem('The tenant id given to this page is not valid.');
      return;
    }
    this.#show('loading');
    const result = await this.#api().show();
    if (generation !== this.#generation) return;
    if (result.ok) {
      this.#showConnected(result.body);
      this.#dispatchChange(result.body);
      this.#focusStart();
    } else if (result.status === 404 && result.error.code === 'not_connected') {
      this.#showSetup();
      this.#dispatchChange(null);
      this.#focusStart();
    } else {
      this.#problem(this.#errorSentence(result), { retry: result.status === 0 || result.status >= 500 });
    }
  }

  #errorSentence(result) {
    if (result.status === 401) {
      return `Your Atlas session has expired or is not valid. Reload the integrations page and try again. (${result.error.message})`;
    }
    return result.error.message;
  }

  // ---------------------------------------------------------------- the connected view

  #showConnected(summary) {
    const ui = this.#ui;
    this.#summary = summary;
    if (isMode(summary.mode)) this.#setMode(summary.mode);
    const status = summary.status;
    ui.connectedHeading.textContent = status === 'active' ? 'Stripe is connected' : status === 'revoked' ? 'Stripe no longer accepts this key' : 'Stripe is connected, but needs attention';
    ui.status.textContent = STATUS_LABELS[status] ?? status;
    ui.status.dataset.status = status;
    ui.summaryMode.textContent = summary.mode === 'live' ? 'Live' : 'Test';
    ui.keyType.textContent = KEY_TYPE_LABELS[summary.key_type] ?? summary.key_type;
    const prefix = `${summary.key_type === 'secret' ? 'sk' : 'rk'}_${summary.mode}_`;
    ui.keyLast4.textContent = `${prefix}…${summary.key_last4}`;
    for (const [el, iso] of [[ui.verifiedAt, summary.verified_at], [ui.connectedAt, summary.connected_at]]) {
      el.dateTime = iso;
      el.title = iso;
      el.textContent = formatTime(iso);
    }
    ui.warnings.replaceChildren(...(summary.warnings ?? []).map((code) =>
      h('div', { class: 'notice warning', 'data-warning': code, text: WARNING_TEXT[code] ?? `Warning: ${code}.` })));
    const permissions = summary.permissions ?? {};
    const missing = RESOURCES.filter((r) => permissions[r.id] === 'missing').map((r) => r.id);
    this.#fillChecklist(ui.summaryChecklist, (id) => permissions[id]);
    ui.summaryFix.replaceChildren();
    if (status === 'revoked') {
      ui.summaryFix.append('Create a new key in Stripe and paste it below to reconnect.');
    } else if (missing.length > 0) {
      ui.summaryFix.append('Atlas needs the missing permissions: ',
        externalLink(createKeyUrl(summary.mode), 'create a key with all five in Stripe'), ', then paste it below.');
    }
    ui.summaryFix.hidden = ui.summaryFix.childNodes.length === 0;
    this.#show('connected');
    // A key that no longer works: offer the paste field straight away.
    if (status !== 'active') {
      this.#replacing = true;
      this.#render();
    }
  }

  #fillChecklist(list, accessOf) {
    list.replaceChildren(...RESOURCES.map((r) => {
      const access = accessOf(r.id);
      const state = access === 'granted' ? 'Granted' : access === 'missing' ? 'Missing' : 'Not checked';
      return h('li', { 'data-resource': r.id, 'data-access': access ?? 'unknown' },
        h('span', { class: 'mark', 'aria-hidden': 'true', text: access === 'granted' ? '✓' : access === 'missing' ? '✗' : '?' }),
        h('span', { class: 'resource', text: r.label }),
        h('span', { class: 'visually-hidden', text: ': ' }),
        h('span', { class: 'access', text: state }));
    }));
  }

  #toggleReplace() {
    this.#replacing = !this.#replacing;
    this.#clearResult();
    this.#render();
    if (this.#replacing) this.#ui.keyInput.focus();
  }

  async #verify() {
    if (this.#busy) return;
    const ui = this.#ui;
    this.#setActionResult(null);
    this.#setBusy(ui.verify, 'Re-verifying…');
    const result = await this.#api().verify();
    this.#clearBusy(ui.verify, 'Re-verify');
    if (result.ok) {
      this.#showConnected(result.body);
      const text = `Re-verified with Stripe: ${STATUS_LABELS[result.body.status] ?? result.body.status}.`;
      this.#setActionResult(text, 'success');
      this.#announce(text);
      ui.verify.focus();
    } else if (result.status === 404) {
      this.#summary = null;
      this.#showSetup();
      this.#announce('This tenant has no Stripe connection any more.');
      this.#dispatchChange(null);
      this.#focusStart();
    } else {
      const text = this.#errorSentence(result);
      this.#setActionResult(text, 'error', result.error.request_id);
      this.#announce(text);
      ui.verify.focus();
    }
  }

  #setActionResult(text, kind, requestId) {
    const box = this.#ui.actionResult;
    box.replaceChildren();
    box.className = 'action-result';
    if (!text) return;
    box.classList.add('notice', kind);
    box.append(h('p', { text }));
    if (requestId) box.append(h('p', { class: 'muted small', text: `Reference: ${requestId}` }));
  }

  #askDisconnect() {
    this.#confirming = true;
    this.#setActionResult(null);
    this.#render();
    this.#ui.confirmCancel.focus();
  }

  #cancelDisconnect() {
    this.#confirming = false;
    this.#render();
    this.#ui.disconnect.focus();
  }

  async #disconnect() {
    if (this.#busy) return;
    const ui = this.#ui;
    this.#setBusy(ui.confirmYes, 'Disconnecting…');
    ui.confirmCancel.disabled = true;
    const result = await this.#api().disconnect();
    this.#clearBusy(ui.confirmYes, 'Disconnect Stripe');
    ui.confirmCancel.disabled = false;
    if (result.ok || result.status === 404) {
      this.#summary = null;
      this.#forgetPendingKey();
      this.#showSetup();
      this.#announce('Stripe is disconnected. The stored key was deleted.');
      this.#dispatchChange(null);
      this.#focusStart();
    } else {
      this.#confirming = false;
      this.#render();
      const text = this.#errorSentence(result);
      this.#setActionResult(text, 'error', result.error.request_id);
      this.#announce(text);
      ui.disconnect.focus();
    }
  }

  // ---------------------------------------------------------------- creating and pasting a key

  #showSetup() {
    this.#clearResult();
    this.#setFieldCheck(null);
    this.#show('setup');
  }

  #toggleShowKey() {
    const ui = this.#ui;
    const shown = ui.showKey.getAttribute('aria-pressed') !== 'true';
    ui.showKey.setAttribute('aria-pressed', String(shown));
    ui.showKey.textContent = shown ? 'Hide' : 'Show';
    ui.keyInput.classList.toggle('masked', !shown);
  }

  #setFieldCheck(result) {
    const ui = this.#ui;
    ui.keyCheck.replaceChildren();
    ui.keyCheck.className = 'field-check';
    delete ui.keyCheck.dataset.code;
    ui.keyInput.setAttribute('aria-invalid', String(Boolean(result && !result.ok)));
    if (!result) return;
    if (result.ok) {
      ui.keyCheck.classList.add('ok');
      const kind = result.kind === 'secret' ? 'Secret' : 'Restricted';
      ui.keyCheck.textContent = `${kind} ${result.mode}-mode key ending in ${result.last4}: ready to activate.`;
    } else {
      ui.keyCheck.classList.add('error');
      ui.keyCheck.dataset.code = result.code;
      ui.keyCheck.textContent = result.message;
    }
  }

  #onKeyInput(event) {
    // A new paste replaces whatever a Retry would have sent.
    this.#forgetPendingKey();
    const value = this.#ui.keyInput.value;
    if (event.inputType === 'insertFromPaste' || event.inputType === 'insertFromDrop') this.#touched = true;
    if (value === '') {
      this.#touched = false;
      this.#setFieldCheck(null);
      return;
    }
    const decisive = decisiveRefusal(value, this.#mode);
    if (decisive) {
      // Announced once, not at every keystroke.
      if (this.#ui.keyCheck.dataset.code !== decisive.code) this.#announce(decisive.message);
      this.#setFieldCheck(decisive);
    } else if (this.#touched) {
      this.#setFieldCheck(checkKey(value, this.#mode));
    } else {
      const result = checkKey(value, this.#mode);
      this.#setFieldCheck(result.ok ? result : null);
    }
  }

  #onKeyBlur() {
    const value = this.#ui.keyInput.value;
    if (value === '') return;
    this.#touched = true;
    this.#setFieldCheck(checkKey(value, this.#mode));
  }

  #onSubmit(event) {
    event.preventDefault();
    if (this.#busy) return;
    const ui = this.#ui;
    const pasted = ui.keyInput.value;
    // Read once, then gone from the page whatever happens next.
    ui.keyInput.value = '';
    this.#touched = false;
    const check = checkKey(pasted, this.#mode);
    if (!check.ok) {
      this.#clearResult();
      this.#setFieldCheck(check);
      this.#announce(check.message);
      ui.keyInput.focus();
      return;
    }
    this.#setFieldCheck(null);
    this.#connect(normaliseKey(pasted));
  }

  #retryConnect() {
    if (this.#pendingKey) this.#connect(this.#pendingKey);
    else this.#ui.keyInput.focus();
  }

  #keepPendingKey(key) {
    this.#forgetPendingKey();
    this.#pendingKey = key;
    this.#pendingTimer = setTimeout(() => {
      this.#forgetPendingKey();
      this.#ui.resultRetry.hidden = true;
    }, PENDING_KEY_TTL_MS);
  }

  #forgetPendingKey() {
    this.#pendingKey = null;
    clearTimeout(this.#pendingTimer);
  }

  async #connect(key) {
    const ui = this.#ui;
    this.#forgetPendingKey();
    clearInterval(this.#countdownTimer);
    this.#clearResult();
    ui.result.hidden = false;
    ui.result.setAttribute('aria-busy', 'true');
    ui.resultTitle.textContent = 'Checking the key with Stripe…';
    ui.resultText.textContent = 'Atlas is confirming, without changing anything in your account, that the key can write each of the five resources.';
    this.#setBusy(ui.activate, 'Activating…');
    ui.keyInput.disabled = true;
    ui.result.focus();
    this.#announce('Checking the key with Stripe.');

    const result = await this.#api().connect(key);

    ui.keyInput.disabled = false;
    this.#clearBusy(ui.activate, 'Activate');
    ui.result.removeAttribute('aria-busy');
    if (result.ok) {
      this.#clearResult();
      this.#replacing = false;
      this.#showConnected(result.body);
      const s = result.body;
      const text = `${result.status === 201 ? 'Connected' : 'Key replaced'}: ${KEY_TYPE_LABELS[s.key_type] ?? s.key_type} ending in ${s.key_last4}, ${s.mode} mode, ${STATUS_LABELS[s.status] ?? s.status}.`;
      this.#announce(text);
      this.#dispatchChange(s);
      ui.connectedHeading.focus();
      return;
    }
    this.#showFailure(result, key);
    ui.result.focus();
  }

  #clearResult() {
    const ui = this.#ui;
    clearInterval(this.#countdownTimer);
    ui.result.hidden = true;
    ui.result.removeAttribute('aria-busy');
    ui.result.className = 'result';
    delete ui.result.dataset.code;
    ui.resultTitle.textContent = '';
    ui.resultText.textContent = '';
    ui.resultChecklist.replaceChildren();
    ui.resultChecklist.hidden = true;
    ui.resultFix.replaceChildren();
    ui.resultFix.hidden = true;
    ui.resultRef.textContent = '';
    ui.resultRef.hidden = true;
    ui.resultRetry.hidden = true;
    ui.resultRetry.disabled = false;
    ui.resultRetry.textContent = 'Retry';
  }

  #showFailure(result, key) {
    const ui = this.#ui;
    const error = result.error;
    ui.result.hidden = false;
    ui.result.classList.add(error.code === 'missing_permissions' ? 'warning' : 'error');
    ui.result.dataset.code = error.code;
    if (error.request_id) {
      ui.resultRef.textContent = `Reference: ${error.request_id}`;
      ui.resultRef.hidden = false;
    }
    switch (error.code) {
      case 'missing_permissions': {
        const missing = new Set(Array.isArray(error.missing) ? error.missing : []);
        const labels = RESOURCES.filter((r) => missing.has(r.id)).map((r) => r.label);
        ui.resultTitle.textContent = 'This key is missing permissions';
        let text = `Atlas needs write access to ${labels.join(', ')}, which this key does not have. Nothing was stored. Create a key with every permission Atlas needs, then paste it above.`;
        if (missing.size >= RESOURCES.length) {
          text += ' Every permission was refused: if the key is limited to certain IP addresses, Stripe refuses Atlas\'s requests the same way; lift the restriction or allow Atlas\'s addresses.';
        }
        ui.resultText.textContent = text;
        this.#fillChecklist(ui.resultChecklist, (id) => (missing.has(id) ? 'missing' : 'granted'));
        ui.resultChecklist.hidden = false;
        const fixUrl = typeof error.fix_url === 'string' && error.fix_url.startsWith(STRIPE_DASHBOARD)
          ? error.fix_url
          : createKeyUrl(this.#mode);
        ui.resultFix.append(externalLink(fixUrl, 'Create a key with the missing permissions in Stripe', { class: 'button primary-outline', 'data-fix': 'true' }));
        ui.resultFix.hidden = false;
        this.#announce(`This key is missing permissions: ${labels.join(', ')}. Nothing was stored.`);
        return;
      }
      case 'mode_mismatch':
        if (isMode(error.tenant_mode)) this.#setMode(error.tenant_mode);
        ui.resultTitle.textContent = 'Wrong mode';
        break;
      case 'key_rejected':
        ui.resultTitle.textContent = 'Stripe refused this key';
        break;
      case 'stripe_unavailable':
      case 'network_error':
        ui.resultTitle.textContent = error.code === 'network_error' ? 'Atlas could not be reached' : 'Stripe could not be reached';
        this.#keepPendingKey(key);
        ui.resultRetry.hidden = false;
        break;
      case 'rate_limited': {
        ui.resultTitle.textContent = 'Too many attempts';
        this.#keepPendingKey(key);
        ui.resultRetry.hidden = false;
        this.#countDown(Math.max(1, Number(result.retryAfter ?? error.retry_after ?? 60)));
        break;
      }
      default:
        ui.resultTitle.textContent = result.status === 401 ? 'Session expired' : 'The key was not connected';
        if (error.retryable) {
          this.#keepPendingKey(key);
          ui.resultRetry.hidden = false;
        }
    }
    const text = this.#errorSentence(result);
    ui.resultText.textContent = text;
    this.#announce(`${ui.resultTitle.textContent}. ${text}`);
  }

  #countDown(seconds) {
    const ui = this.#ui;
    let left = seconds;
    const tick = () => {
      if (left <= 0) {
        clearInterval(this.#countdownTimer);
        ui.resultRetry.disabled = false;
        ui.resultRetry.textContent = 'Retry';
        return;
      }
      ui.resultRetry.disabled = true;
      ui.resultRetry.textContent = `Retry in ${left} s`;
      left -= 1;
    };
    tick();
    this.#countdownTimer = setInterval(tick, 1000);
  }

  // ---------------------------------------------------------------- busy state, focus, events

  #setBusy(button, label) {
    this.#busy = true;
    button.disabled = true;
    button.setAttribute('aria-busy', 'true');
    button.textContent = label;
    this.#ui.dialog.setAttribute('aria-busy', 'true');
  }

  #clearBusy(button, label) {
    this.#busy = false;
    button.disabled = false;
    button.removeAttribute('aria-busy');
    button.textContent = label;
    this.#ui.dialog.removeAttribute('aria-busy');
  }

  #focusables() {
    return [...this.#ui.dialog.querySelectorAll(FOCUSABLE)].filter((el) => el.checkVisibility());
  }

  /** The first thing to focus in the current view. */
  #focusStart() {
    if (this.hidden || !this.#ui) return;
    const ui = this.#ui;
    const target = this.#view === 'setup' ? ui.keyInput
      : this.#view === 'connected' ? ui.connectedHeading
        : ui.title;
    target.focus();
  }

  /** Tab and Shift+Tab cycle inside the modal; Escape closes it (or cancels a confirmation). */
  #onKeydown(event) {
    if (event.key === 'Escape') {
      event.preventDefault();
      if (this.#confirming) this.#cancelDisconnect();
      else this.#requestClose();
      return;
    }
    if (event.key !== 'Tab') return;
    const items = this.#focusables();
    if (items.length === 0) {
      event.preventDefault();
      return;
    }
    const active = this.shadowRoot.activeElement;
    const first = items[0];
    const last = items[items.length - 1];
    const index = items.indexOf(active);
    if (event.shiftKey && (index <= 0)) {
      event.preventDefault();
      last.focus();
    } else if (!event.shiftKey && (index === -1 || active === last)) {
      event.preventDefault();
      first.focus();
    }
  }

  /** Focus that escapes to the host page while the modal is shown comes back. */
  #keepFocus(event) {
    if (this.hidden || !this.#ui || this.contains(event.target) || event.target === this) return;
    this.#focusStart();
  }

  #requestClose() {
    this.dispatchEvent(new CustomEvent('atlas-stripe-connect:close', { bubbles: true, composed: true }));
  }

  #dispatchChange(connection) {
    this.dispatchEvent(new CustomEvent('atlas-stripe-connect:change', { bubbles: true, composed: true, detail: { connection } }));
  }
}

if (!customElements.get('atlas-stripe-connect')) {
  customElements.define('atlas-stripe-connect', AtlasStripeConnect);
}
