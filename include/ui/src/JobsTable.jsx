import { useEffect, useState } from "preact/hooks";
import { api, explain } from "./api.js";
import { Champions } from "./Champions.jsx";
import { fmtCost, fmtDuration, fmtTime, jobDuration } from "./format.js";

const STATUSES = ["", "pending", "provisioning", "running", "completed", "failed", "cancelled"];
const PAGE = 50;
const REFRESH_MS = 5000;

export function StatusBadge({ status }) {
  return <span class={`badge status-${status}`}>{status}</span>;
}

export function JobsTable() {
  const [filters, setFilters] = useState({ status: "", project_id: "", provider: "" });
  const [offset, setOffset] = useState(0);
  const [data, setData] = useState(null);
  const [error, setError] = useState(null);

  useEffect(() => {
    let alive = true;
    const load = () =>
      api("jobs", { params: { ...filters, limit: PAGE, offset } })
        .then((body) => alive && (setData(body), setError(null)))
        .catch((err) => alive && setError(explain(err)));
    load();
    const timer = setInterval(load, REFRESH_MS);
    return () => {
      alive = false;
      clearInterval(timer);
    };
  }, [filters, offset]);

  const set = (key) => (ev) => {
    setOffset(0);
    setFilters({ ...filters, [key]: ev.currentTarget.value.trim() });
  };

  return (
    <section>
      <h1>Training jobs</h1>
      <Champions />
      <form class="filters" onSubmit={(ev) => ev.preventDefault()}>
        <label>
          Status{" "}
          <select value={filters.status} onChange={set("status")} data-testid="filter-status">
            {STATUSES.map((s) => (
              <option value={s}>{s || "any"}</option>
            ))}
          </select>
        </label>
        <label>
          Project <input value={filters.project_id} onChange={set("project_id")} placeholder="any" />
        </label>
        <label>
          Provider <input value={filters.provider} onChange={set("provider")} placeholder="any" />
        </label>
      </form>
      {error && <p class="error" role="alert">{error}</p>}
      {!data && !error && <p>Loading…</p>}
      {data && (
        <>
          <table class="jobs" data-testid="jobs-table">
            <thead>
              <tr>
                <th>Status</th>
                <th>Project</th>
                <th>Provider</th>
                <th>GPU</th>
                <th>Duration</th>
                <th>Cost</th>
                <th>Created</th>
                <th>Job</th>
              </tr>
            </thead>
            <tbody>
              {data.jobs.map((job) => (
                <tr key={job.uuid} data-job={job.uuid} onClick={() => (window.location.hash = `#/jobs/${job.uuid}`)}>
                  <td>
                    <StatusBadge status={job.status} />
                  </td>
                  <td>{job.project_id}</td>
                  <td>{job.provider}</td>
                  <td>{job.gpu || "—"}</td>
                  <td>{fmtDuration(jobDuration(job))}</td>
                  <td>{fmtCost(job.cost_usd)}</td>
                  <td>{fmtTime(job.created_at)}</td>
                  <td>
                    <a href={`#/jobs/${job.uuid}`} class="mono">
                      {job.uuid.slice(0, 8)}
                    </a>
                  </td>
                </tr>
              ))}
              {data.jobs.length === 0 && (
                <tr>
                  <td colSpan={8} class="muted">
                    No jobs (that you may read) match.
                  </td>
                </tr>
              )}
            </tbody>
          </table>
          <p class="pager">
            {data.total ? `${offset + 1}–${offset + data.jobs.length} of ${data.total}` : ""}{" "}
            <button type="button" disabled={offset === 0} onClick={() => setOffset(Math.max(0, offset - PAGE))}>
              ‹ Newer
            </button>{" "}
            <button type="button" disabled={offset + PAGE >= data.total} onClick={() => setOffset(offset + PAGE)}>
              Older ›
            </button>
          </p>
        </>
      )}
    </section>
  );
}
