import { useEffect, useState } from "preact/hooks";
import { explain } from "./api.js";
import { Champions } from "./Champions.jsx";
import { fetchJobs } from "./data.js";
import { fmtCost, fmtDuration, fmtTime, shorten, trainingSeconds, wallSeconds } from "./format.js";
import { compareHref, href, jobHref, navigate } from "./router.js";

const STATUSES = ["", "pending", "provisioning", "running", "completed", "failed", "cancelled"];
const FILTERS = ["status", "project_id", "provider"];
const PAGE = 50;
const REFRESH_MS = 5000;

export function StatusBadge({ status }) {
  return <span class={`badge status-${status}`}>{status}</span>;
}

/** A jobs table's rows (the jobs table, a run's jobs): click a row for the job, tick rows to
 * compare them. `columns` adds columns after the status. */
export function JobRows({ jobs, selected, onSelect, columns = [], now }) {
  return jobs.map((job) => (
    <tr key={job.uuid} data-job={job.uuid} onClick={() => navigate(jobHref(job.uuid))}>
      <td>
        <StatusBadge status={job.status} />
      </td>
      {columns.map((c) => (
        <td>{c.cell(job)}</td>
      ))}
      <td>{fmtDuration(wallSeconds(job, now))}</td>
      <td>{fmtDuration(trainingSeconds(job, now))}</td>
      <td>{fmtCost(job.cost_usd)}</td>
      <td>{fmtTime(job.created_at)}</td>
      <td class="reason-short" title={job.failure_reason || ""} data-testid="failure">
        {shorten(job.failure_reason, 60)}
      </td>
      <td>
        <a href={jobHref(job.uuid)} class="mono" onClick={(ev) => ev.stopPropagation()}>
          {job.uuid.slice(0, 8)}
        </a>
      </td>
      <td class="pick" onClick={(ev) => ev.stopPropagation()}>
        <input
          type="checkbox"
          data-testid="compare-check"
          aria-label={`compare ${job.uuid}`}
          checked={selected.includes(job.uuid)}
          onChange={(ev) => onSelect(job.uuid, ev.currentTarget.checked)}
        />
      </td>
    </tr>
  ));
}

export function JobHeadings({ columns = [] }) {
  return (
    <tr>
      <th>Status</th>
      {columns.map((c) => (
        <th>{c.title}</th>
      ))}
      <th title="created → ended">Wall time</th>
      <th title="the trainer's PROJECT start → end">Training</th>
      <th>Cost</th>
      <th>Created</th>
      <th>Failure reason</th>
      <th>Job</th>
      <th title="tick two or more to compare them">Compare</th>
    </tr>
  );
}

/** "Compare n jobs" once two or more rows are ticked. */
export function CompareButton({ selected, onClear }) {
  if (selected.length < 1) return null;
  return (
    <span class="compare-bar">
      <a
        href={selected.length >= 2 ? compareHref(selected) : undefined}
        class={`button${selected.length >= 2 ? "" : " disabled"}`}
        data-testid="compare-button"
        aria-disabled={String(selected.length < 2)}
      >
        Compare {selected.length} job{selected.length > 1 ? "s" : ""}
      </a>{" "}
      {selected.length < 2 && <span class="small muted">tick one more</span>}
      <button type="button" onClick={onClear}>
        Clear
      </button>
    </span>
  );
}

export function useSelection() {
  const [selected, setSelected] = useState([]);
  const onSelect = (uuid, on) => setSelected((s) => (on ? [...s.filter((u) => u !== uuid), uuid] : s.filter((u) => u !== uuid)));
  return [selected, onSelect, () => setSelected([])];
}

const COLUMNS = [
  { title: "Project", cell: (job) => job.project_id },
  { title: "Provider", cell: (job) => job.provider },
  { title: "GPU", cell: (job) => job.gpu || "—" },
];

/** The jobs table (#/?status=&project_id=&provider=&offset=): its filters and page are in the URL. */
export function JobsTable({ query = {} }) {
  const filters = Object.fromEntries(FILTERS.map((k) => [k, query[k] || ""]));
  const offset = Math.max(0, Number.parseInt(query.offset || "0", 10) || 0);
  const [data, setData] = useState(null);
  const [error, setError] = useState(null);
  const [selected, onSelect, clear] = useSelection();
  const key = JSON.stringify([filters, offset]);

  useEffect(() => {
    let alive = true;
    const load = () =>
      fetchJobs({ ...filters, limit: PAGE, offset })
        .then((body) => alive && (setData(body), setError(null)))
        .catch((err) => alive && setError(explain(err)));
    load();
    const timer = setInterval(load, REFRESH_MS);
    return () => {
      alive = false;
      clearInterval(timer);
    };
  }, [key]);

  const go = (changes) => navigate(href([], { ...filters, offset: offset || "", ...changes }), { replace: true });
  const set = (name) => (ev) => go({ [name]: ev.currentTarget.value.trim(), offset: "" });
  const now = Date.now() / 1000;

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
          Project <input value={filters.project_id} onChange={set("project_id")} placeholder="any" data-testid="filter-project" />
        </label>
        <label>
          Provider <input value={filters.provider} onChange={set("provider")} placeholder="any" data-testid="filter-provider" />
        </label>
        <CompareButton selected={selected} onClear={clear} />
      </form>
      {error && <p class="error" role="alert">{error}</p>}
      {!data && !error && <p>Loading…</p>}
      {data && (
        <>
          <div class="scroll-x">
            <table class="jobs" data-testid="jobs-table">
              <thead>
                <JobHeadings columns={COLUMNS} />
              </thead>
              <tbody>
                <JobRows jobs={data.jobs} selected={selected} onSelect={onSelect} columns={COLUMNS} now={now} />
                {data.jobs.length === 0 && (
                  <tr>
                    <td colSpan={COLUMNS.length + 8} class="muted">
                      No jobs (that you may read) match.
                    </td>
                  </tr>
                )}
              </tbody>
            </table>
          </div>
          <p class="pager">
            {data.total ? `${offset + 1}–${offset + data.jobs.length} of ${data.total}` : ""}{" "}
            <button type="button" disabled={offset === 0} onClick={() => go({ offset: Math.max(0, offset - PAGE) || "" })}>
              ‹ Newer
            </button>{" "}
            <button type="button" disabled={offset + PAGE >= data.total} onClick={() => go({ offset: offset + PAGE })}>
              Older ›
            </button>
          </p>
        </>
      )}
    </section>
  );
}
