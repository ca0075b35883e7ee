export function fmtDuration(seconds) {
  if (seconds === null || seconds === undefined || Number.isNaN(seconds)) return "—";
  const s = Math.max(0, Math.round(seconds));
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const r = s % 60;
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
  return `${i ? v.toFixed(1) : v} ${units[i]}`;
}

export const fmtNum = (v, digits = 4) => (v === null || v === undefined ? "—" : Number(v).toFixed(digits));

/** Seconds the job has run: time_taken once known, else from started_at to its end (or now). */
export function jobDuration(job, now = Date.now() / 1000) {
  if (job.time_taken !== null && job.time_taken !== undefined) return job.time_taken;
  const start = ts(job.started_at);
  if (start === null) return null;
  return (ts(job.completed_at) ?? now) - start;
}
