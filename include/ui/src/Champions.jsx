import { useEffect, useState } from "preact/hooks";
import { api, explain } from "./api.js";
import { fmtNum, fmtTime } from "./format.js";

// The champion of each model name (a retraining spec with a promotion rule) and every promotion
// decision of one name: GET /v1/models and /v1/models/<name>.

const REFRESH_MS = 15000;
const PAGE = 50;

export const modelHref = (name) => `#/models/${encodeURIComponent(name)}`;

function JobLink({ uuid }) {
  if (!uuid) return <span class="muted">—</span>;
  return (
    <a href={`#/jobs/${uuid}`} class="mono">
      {uuid.slice(0, 8)}
    </a>
  );
}

export function DecisionBadge({ promoted }) {
  return (
    <span class={`badge ${promoted ? "decision-promoted" : "decision-not"}`}>
      {promoted ? "promoted" : "not promoted"}
    </span>
  );
}

const metricValue = (metric, value) => `${metric} = ${fmtNum(value)}`;

/** Loads ``path`` now and every REFRESH_MS (while mounted): [body, error]. */
function usePolled(path, params) {
  const [body, setBody] = useState(null);
  const [error, setError] = useState(null);
  const key = JSON.stringify([path, params]);
  useEffect(() => {
    let alive = true;
    const load = () =>
      api(path, { params })
        .then((data) => alive && (setBody(data), setError(null)))
        .catch((err) => alive && setError(explain(err)));
    load();
    const timer = setInterval(load, REFRESH_MS);
    return () => {
      alive = false;
      clearInterval(timer);
    };
  }, [key]);
  return [body, error];
}

/** The champions table of the jobs page; nothing at all while no model has a decision. */
export function Champions() {
  const [body, error] = usePolled("models");
  if (error) {
    return (
      <section data-testid="champions">
        <h2>Champions</h2>
        <p class="error">{error}</p>
      </section>
    );
  }
  if (!body || body.models.length === 0) return null;
  return (
    <>
      <section data-testid="champions">
        <h2>Champions</h2>
        <table class="compact champions" data-testid="champions-table">
          <thead>
            <tr>
              <th>Model</th>
              <th>Champion</th>
              <th>Metric</th>
              <th>Promoted</th>
              <th>Decisions</th>
              <th>Latest decision</th>
            </tr>
          </thead>
          <tbody>
            {body.models.map((m) => (
              <tr key={m.name} data-model={m.name}>
                <td>
                  <a href={modelHref(m.name)}>{m.name}</a>
                </td>
                <td data-testid="champion-job">
                  {m.champion ? <JobLink uuid={m.champion.job_uuid} /> : <span class="muted">none</span>}
                </td>
                <td>{m.champion ? metricValue(m.champion.metric, m.champion.value) : "—"}</td>
                <td>{m.champion ? fmtTime(m.champion.decided_at) : "—"}</td>
                <td>{m.decision_count}</td>
                <td class="reason" data-testid="latest-decision" data-promoted={String(m.latest.promoted)}>
                  <span class={m.latest.promoted ? "ok" : undefined}>{m.latest.reason}</span>{" "}
                  <span class="small">
                    <JobLink uuid={m.latest.job_uuid} />, {fmtTime(m.latest.decided_at)}
                  </span>
                </td>
              </tr>
            ))}
          </tbody>
        </table>
      </section>
      <h2>Jobs</h2>
    </>
  );
}

/** Every promotion decision of one model name, newest first (#/models/<name>). */
export function ModelView({ name }) {
  const [offset, setOffset] = useState(0);
  const [body, error] = usePolled(`models/${encodeURIComponent(name)}`, { limit: PAGE, offset });
  const back = (
    <p>
      <a href="#/">‹ All jobs</a>
    </p>
  );
  if (!body) {
    return (
      <section>
        {back}
        {error ? (
          <p class="error" role="alert">
            {error}
          </p>
        ) : (
          <p>Loading…</p>
        )}
      </section>
    );
  }
  const champion = body.champion;
  const rule = body.decisions[0]?.rule;
  return (
    <section data-testid="model-view" data-model={body.name}>
      {back}
      <h1>
        {body.name} <span class="small">model</span>
      </h1>
      <div class="summary">
        {champion ? (
          <>
            <span class="badge champion">champion</span>
            <JobLink uuid={champion.job_uuid} />
            <span>{metricValue(champion.metric, champion.value)}</span>
            <span>promoted {fmtTime(champion.decided_at)}</span>
            <span class="muted">
              {champion.dag_id} / {champion.run_id}
            </span>
          </>
        ) : (
          <span class="muted">No champion.</span>
        )}
        {rule && <span class="mono small">rule {JSON.stringify(rule)}</span>}
      </div>
      {error && <p class="error">{error}</p>}
      <h2>Decisions</h2>
      <table class="compact" data-testid="decisions-table">
        <thead>
          <tr>
            <th>Decided</th>
            <th>Job</th>
            <th>Value</th>
            <th>Previous champion</th>
            <th>Previous value</th>
            <th>Outcome</th>
            <th>Reason</th>
            <th>Retired</th>
          </tr>
        </thead>
        <tbody>
          {body.decisions.map((d) => (
            <tr key={`${d.job_uuid}-${d.decided_at}`} data-job={d.job_uuid}>
              <td>{fmtTime(d.decided_at)}</td>
              <td>
                <JobLink uuid={d.job_uuid} />
              </td>
              <td>{metricValue(d.metric, d.value)}</td>
              <td>
                <JobLink uuid={d.previous_champion_job_uuid} />
              </td>
              <td>{fmtNum(d.previous_value)}</td>
              <td>
                <DecisionBadge promoted={d.promoted} /> {d.is_champion && <span class="badge champion">champion</span>}
              </td>
              <td class="reason">{d.reason}</td>
              <td>{d.retired_at ? fmtTime(d.retired_at) : "—"}</td>
            </tr>
          ))}
        </tbody>
      </table>
      <p class="pager">
        {body.total ? `${offset + 1}–${offset + body.decisions.length} of ${body.total}` : ""}{" "}
        <button type="button" disabled={offset === 0} onClick={() => setOffset(Math.max(0, offset - PAGE))}>
          ‹ Newer
        </button>{" "}
        <button type="button" disabled={offset + PAGE >= body.total} onClick={() => setOffset(offset + PAGE)}>
          Older ›
        </button>
      </p>
    </section>
  );
}
