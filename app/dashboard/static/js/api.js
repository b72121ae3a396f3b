// The dashboard's only way to the data: the gateway's public endpoints, with the
// session cookie and the header that lets the endpoints accept it.

const HEADERS = { "X-Flywheel-Dashboard": "1", Accept: "application/json" };

export class ApiError extends Error {
  constructor(status, body) {
    super(body?.error?.message ?? `request failed with ${status}`);
    this.status = status;
    this.code = body?.error?.code ?? null;
  }
}

function url(path, params) {
  const u = new URL(path, location.origin);
  for (const [k, v] of Object.entries(params ?? {})) {
    if (v !== null && v !== undefined && v !== "") u.searchParams.set(k, String(v));
  }
  return u;
}

async function send(method, path, { params, body } = {}) {
  const init = { method, credentials: "same-origin", headers: { ...HEADERS } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(url(path, params), init);
  if (response.status === 401) {
    // The session ended (expired, logged out, or the master key changed).
    location.assign(`/dashboard/login${location.hash}`);
    throw new ApiError(401, null);
  }
  const data = await response.json().catch(() => null);
  if (!response.ok) throw new ApiError(response.status, data);
  return data;
}

export const api = {
  get: (path, params) => send("GET", path, { params }),
  post: (path, body) => send("POST", path, { body }),
};
