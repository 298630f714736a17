// The tenant-facing API of atlas-stripe (docs/API.md), as the modal calls it. The
// tenant token goes in the Authorization header only: never in a URL, never stored, never
// logged. Every failure comes back in one shape, `{code, message, request_id, …}`.

/**
 * @typedef {{ok: true, status: number, body: any}
 *         | {ok: false, status: number, error: {code: string, message: string, request_id?: string,
 *            missing?: string[], fix_url?: string, retryable?: boolean, retry_after?: number,
 *            tenant_mode?: string, key_mode?: string}, retryAfter: number | null}} ApiResult
 */

export class ConnectApi {
  #base;
  #tenantId;
  #token;

  /**
   * @param {{base: string, tenantId: string, token: string}} options `base` is the service's
   *   origin (or a path prefix on the embedding app's origin); empty means this origin.
   */
  constructor({ base, tenantId, token }) {
    this.#base = String(base ?? '').replace(/\/+$/, '');
    this.#tenantId = tenantId;
    this.#token = token;
  }

  #url(suffix) {
    return `${this.#base}/v1/tenants/${encodeURIComponent(this.#tenantId)}/stripe/connection${suffix}`;
  }

  /** `GET …/connection`: 200 summary, 404 `not_connected`. */
  show() {
    return this.#send('GET', '');
  }

  /** The modal's Activate: 201 or 200 summary, or an error with its extra fields. */
  connect(apiKey) {
    return this.#send('POST', '', { api_key: apiKey });
  }

  verify() {
    return this.#send('POST', '/verify');
  }

  disconnect() {
    return this.#send('DELETE', '');
  }

  /** @returns {Promise<ApiResult>} */
  async #send(method, suffix, body) {
    const headers = { Accept: 'application/json', Authorization: `Bearer ${this.#token}` };
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    let response;
    try {
      response = await fetch(this.#url(suffix), {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        credentials: 'omit',
        cache: 'no-store',
        referrerPolicy: 'no-referrer',
        redirect: 'error',
      });
    } catch {
      return {
        ok: false,
        status: 0,
        error: {
          code: 'network_error',
          message: 'Could not reach Atlas. Check your connection and try again.',
          retryable: true,
        },
        retryAfter: null,
      };
    }
    const json = await readJson(response);
    if (response.ok) return { ok: true, status: response.status, body: json };
    const error =
      json && typeof json.error === 'object' && json.error !== null && typeof json.error.message === 'string'
        ? json.error
        : {
            code: 'unexpected_response',
            message: `Atlas answered with an unexpected error (HTTP ${response.status}). Try again shortly.`,
            retryable: response.status >= 500,
          };
    const retryAfter = Number.parseInt(response.headers.get('Retry-After') ?? '', 10);
    return {
      ok: false,
      status: response.status,
      error,
      retryAfter: Number.isFinite(retryAfter) ? retryAfter : (error.retry_after ?? null),
    };
  }
}

async function readJson(response) {
  if (response.status === 204) return null;
  if (!(response.headers.get('Content-Type') ?? '').includes('application/json')) return null;
  try {
    return await response.json();
  } catch {
    return null;
  }
}
