// Calls to the results API. The page is served at <base>/training/ui/ by the same api-server, so
// "../v1/..." is the API at any base URL, and the browser sends the Airflow UI's session cookie
// (`_token`, set at sign-in) with every same-origin request: the API authenticates the user exactly
// as it does for the Airflow UI. No token is read or stored by this page.

export const API = new URL("../v1/", window.location.href);

export const TERMINAL = new Set(["completed", "failed", "cancelled"]);

export class ApiError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
  }
}

async function detailOf(resp) {
  try {
    const body = await resp.json();
    if (typeof body.detail === "string") return body.detail;
    return JSON.stringify(body.detail ?? body);
  } catch {
    return resp.statusText || `HTTP ${resp.status}`;
  }
}

export function apiUrl(path, params) {
  const url = new URL(path.replace(/^\//, ""), API);
  for (const [k, v] of Object.entries(params || {})) {
    if (v !== undefined && v !== null && v !== "") url.searchParams.set(k, v);
  }
  return url.toString();
}

export async function api(path, { method = "GET", params } = {}) {
  const resp = await fetch(apiUrl(path, params), {
    method,
    credentials: "same-origin",
    headers: { Accept: "application/json" },
  });
  if (!resp.ok) throw new ApiError(resp.status, await detailOf(resp));
  return resp.json();
}

export function explain(err) {
  if (err instanceof ApiError && err.status === 401) {
    return "Not signed in to Airflow (or the session expired): sign in again and reload.";
  }
  if (err instanceof ApiError) return `${err.status}: ${err.message}`;
  return String(err?.message ?? err);
}

export const artifactUrl = (uuid, id) => apiUrl(`jobs/${encodeURIComponent(uuid)}/artifacts/${id}`);
export const streamUrl = (uuid, params) => apiUrl(`jobs/${encodeURIComponent(uuid)}/stream`, params);
