// The dashboard's only way to the server: the public REST API, with the API key as a bearer token.
// The key lives in sessionStorage (this tab, this origin; never a URL, never a cookie), so a page served from
// a sandbox port ({port}-{id}.{domain}, another origin) cannot read it, and closing the tab forgets it.

const KEY = "corral.apiKey";
const ROLE = "corral.role";
const listeners = new Set();

export class ApiError extends Error {
  constructor(status, code, message, details = {}) {
    super(message);
    this.status = status;
    this.code = code;
    this.details = details;
  }
}

export const session = {
  get key() { return sessionStorage.getItem(KEY); },
  get role() { return sessionStorage.getItem(ROLE); },
  set(key, role) { sessionStorage.setItem(KEY, key); sessionStorage.setItem(ROLE, role); },
  clear() { sessionStorage.removeItem(KEY); sessionStorage.removeItem(ROLE); },
  // called with the API's error when the key stops working (revoked, unknown): back to sign-in
  onSignedOut(fn) { listeners.add(fn); },
};

function signedOut(error) {
  session.clear();
  for (const fn of listeners) fn(error);
}

async function errorOf(response) {
  let body = null;
  try { body = await response.json(); } catch { /* not JSON */ }
  const err = body && body.error;
  if (err && err.message) return new ApiError(response.status, err.code, err.message, err.details || {});
  return new ApiError(response.status, "http_" + response.status, `${response.status} ${response.statusText}`);
}

export async function request(method, path, { body, raw, query, signal, key } = {}) {
  const token = key || session.key;
  const headers = { authorization: `Bearer ${token}` };
  let payload;
  if (raw !== undefined) { payload = raw; headers["content-type"] = "application/octet-stream"; }
  else if (body !== undefined) { payload = JSON.stringify(body); headers["content-type"] = "application/json"; }
  let url = path;
  if (query) {
    const qs = new URLSearchParams();
    for (const [k, v] of Object.entries(query)) {
      if (v === undefined || v === null || v === "") continue;
      for (const item of Array.isArray(v) ? v : [v]) qs.append(k, String(item));
    }
    const s = qs.toString();
    if (s) url += "?" + s;
  }
  const response = await fetch(url, {
    method, headers, body: payload, signal, credentials: "omit", cache: "no-store", referrerPolicy: "no-referrer",
  });
  if (!response.ok) {
    const error = await errorOf(response);
    if (response.status === 401 && !key) signedOut(error);
    throw error;
  }
  return response;
}

export async function json(method, path, options) {
  const response = await request(method, path, options);
  if (response.status === 204) return null;
  return response.json();
}

export const get = (path, query) => json("GET", path, { query });
export const post = (path, body) => json("POST", path, { body: body ?? {} });
export const put = (path, body) => json("PUT", path, { body });
export const del = (path, query) => json("DELETE", path, { query });

// Reads an NDJSON response line by line; `onItem` gets each parsed object. An `{"error": …}` line (an error
// after the stream started) is thrown as ApiError. Resolves when the stream ends; abort with `signal`.
export async function stream(method, path, onItem, { body, query, signal } = {}) {
  const response = await request(method, path, { body, query, signal });
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let nl;
    while ((nl = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, nl).trim();
      buffer = buffer.slice(nl + 1);
      if (!line) continue;
      const item = JSON.parse(line);
      if (item && item.error && !item.kind && !item.type) {
        const error = new ApiError(0, item.error.code, item.error.message, item.error.details || {});
        if (item.error.code === "unauthenticated") signedOut(error);
        throw error;
      }
      onItem(item);
    }
  }
}

// Who a key belongs to, by asking the API: an admin key may list tenants, a tenant key may list sandboxes.
export async function whoIs(key) {
  try {
    await json("GET", "/v1/tenants", { key });
    return "admin";
  } catch (error) {
    if (error.status !== 403) throw error;
  }
  await json("GET", "/v1/sandboxes", { key, query: { limit: 1 } });
  return "tenant";
}

// Latin-1 text (how the API carries process bytes in JSON) back to the bytes it stands for.
export function latin1Bytes(text) {
  const out = new Uint8Array(text.length);
  for (let i = 0; i < text.length; i++) out[i] = text.charCodeAt(i) & 0xff;
  return out;
}

export const sandboxPath = (id, rest = "") => `/v1/sandboxes/${encodeURIComponent(id)}${rest}`;
