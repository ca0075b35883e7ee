import { TERMINAL } from "./api.js";

export function fmtDuration(seconds) {
  if (seconds === null || seconds === undefined || Number.isNaN(seconds)) return "—";
  const s = Math.max(0, Math.round(seconds));
  const d = Math.floor(s / 86400);
  const h = Math.floor((s % 86400) / 3600);
  const m = Math.floor((s % 3600) / 60);
  const r = s % 60;
  if (d) return `${d}d ${String(h).padStart(2, "0")}h`;
  if (h) return `${h}h ${String(m).padStart(2, "0")}m`;
  if (m) return `${m}m ${String(r).padStart(2, "0")}s`;
  return `${r}s`;
}

export const ts = (iso) => (iso ? Date.parse(iso) / 1000 : null);

export function fmtTime(iso) {
  if (!iso) return "—";
  const d = new Date(iso);
  return d.toLocaleString(undefined, {
    year: "numeric",
    month: "short",
    day: "2-digit",
    hour: "2-digit",
    minute: "2-digit",
    second: "2-digit",
  });
}

export function fmtCost(usd) {
  if (usd === null || usd === undefined) return "—";
  return `$${usd < 1 ? usd.toFixed(4) : usd.toFixed(2)}`;
}

export function fmtBytes(n) {
  if (n === null || n === undefined) return "—";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let v = n;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i += 1;
  }
  return `${i ? v.toFixed(v < 10 ? 1 : 0) : v} ${units[i]}`;
}

/** A number as people read it: an integer as an integer (359, not 359.0000), a float with four
 * significant digits (0.1235, 12.35, 1.2e-5), anything else as text. */
export function fmtValue(v) {
  if (v === null || v === undefined) return "—";
  if (typeof v === "number") {
    if (!Number.isFinite(v)) return String(v);
    if (Number.isInteger(v)) return String(v);
    const a = Math.abs(v);
    if (a >= 1e6 || a < 1e-3) return v.toExponential(2).replace(/\.?0+e/, "e");
    if (a >= 1000) return v.toFixed(1).replace(/\.0$/, "");
    return String(Number(v.toPrecision(4)));
  }
  if (typeof v === "object") return JSON.stringify(v);
  return String(v);
}

/** Kept for the model pages: every number through :func:`fmtValue`. */
export const fmtNum = (v) => fmtValue(v);

/** When the job ended (seconds), or null while it has not. A cancelled job ended when the cancel
 * was asked for (its finalize sets completed_at later); a job that ended without completed_at yet
 * ended at its row's last change. */
export function jobEnd(job) {
  if (!TERMINAL.has(job.status)) return null;
  if (job.status === "cancelled" && job.cancel_requested_at) return ts(job.cancel_requested_at);
  return ts(job.completed_at) ?? ts(job.updated_at) ?? ts(job.created_at);
}

/** Wall time: created to ended (to now while it runs; frozen once it ended). */
export function wallSeconds(job, now = Date.now() / 1000) {
  const start = ts(job.created_at);
  if (start === null) return null;
  return Math.max(0, (jobEnd(job) ?? now) - start);
}

/** Training time: the trainer's PROJECT start to end (time_taken once known; frozen once it ended). */
export function trainingSeconds(job, now = Date.now() / 1000) {
  if (job.time_taken !== null && job.time_taken !== undefined) return job.time_taken;
  const start = ts(job.started_at);
  if (start === null) return null;
  const end = job.status === "cancelled" ? jobEnd(job) : (ts(job.completed_at) ?? jobEnd(job) ?? now);
  return Math.max(0, end - start);
}

/** Kept for callers of the old name: the training time. */
export const jobDuration = trainingSeconds;

/** The first line of a text, at most ``max`` characters. */
export function shorten(text, max = 80) {
  if (!text) return "";
  const first = String(text).split("\n")[0];
  return first.length > max ? `${first.slice(0, max - 1)}…` : first;
}

/** {"a": {"b": 1}, "c": [1, 2]} -> [["a.b", 1], ["c", [1, 2]]]: nested objects as dotted keys. */
export function flatten(obj, prefix = "") {
  const out = [];
  for (const [k, v] of Object.entries(obj || {})) {
    const key = prefix ? `${prefix}.${k}` : k;
    if (v && typeof v === "object" && !Array.isArray(v) && Object.keys(v).length) out.push(...flatten(v, key));
    else out.push([key, v]);
  }
  return out;
}
