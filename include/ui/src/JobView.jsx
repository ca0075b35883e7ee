import { useEffect, useMemo, useState } from "preact/hooks";
import { TERMINAL, api, artifactUrl, explain, streamUrl } from "./api.js";
import { LineChart } from "./Chart.jsx";
import { StatusBadge } from "./JobsTable.jsx";
import { fmtBytes, fmtCost, fmtDuration, fmtNum, fmtTime, jobDuration, ts } from "./format.js";

const EVAL_METRICS = ["accuracy", "precision", "recall", "f1", "auc"];
const DETAILS_REFRESH_MS = 10000;

/** Adds an epoch or evaluation row (from the stream) to the details, once (rows have ids). */
function mergeRow(details, kind, row) {
  const iterations = details.iterations.slice();
  let i = iterations.findIndex((it) => it.iteration === row.iteration);
  if (i < 0) {
    iterations.push({ iteration: row.iteration, config: null, steps: [], epochs: [], evals: [] });
    iterations.sort((a, b) => a.iteration - b.iteration);
    i = iterations.findIndex((it) => it.iteration === row.iteration);
  }
  const it = { ...iterations[i] };
  if (it[kind].some((r) => r.id === row.id)) return details;
  it[kind] = [...it[kind], row];
  iterations[i] = it;
  return { ...details, iterations };
}

/** Live updates while the job has not ended: the SSE stream, plus details now and then (instances). */
function useJob(uuid) {
  const [details, setDetails] = useState(null);
  const [error, setError] = useState(null);
  const [live, setLive] = useState(false);

  useEffect(() => {
    let alive = true;
    let source = null;
    let timer = null;
    const refresh = () =>
      api(`jobs/${encodeURIComponent(uuid)}/details`)
        .then((body) => {
          if (!alive) return body;
          setDetails(body);
          setError(null);
          return body;
        })
        .catch((err) => {
          if (alive) setError(explain(err));
          return null;
        });
    refresh().then((body) => {
      if (!alive || !body || TERMINAL.has(body.status)) return;
      source = new EventSource(streamUrl(uuid));
      source.onopen = () => setLive(true);
      source.onerror = () => setLive(source.readyState === EventSource.OPEN);
      source.addEventListener("epoch", (ev) => setDetails((d) => d && mergeRow(d, "epochs", JSON.parse(ev.data))));
      source.addEventListener("eval", (ev) => setDetails((d) => d && mergeRow(d, "evals", JSON.parse(ev.data))));
      source.addEventListener("status", (ev) => {
        const job = JSON.parse(ev.data);
        setDetails((d) => d && { ...d, ...job });
        if (TERMINAL.has(job.status)) {
          source.close();
          setLive(false);
          clearInterval(timer);
          refresh(); // final artifacts, instances and costs
        }
      });
      timer = setInterval(refresh, DETAILS_REFRESH_MS);
    });
    return () => {
      alive = false;
      source?.close();
      clearInterval(timer);
    };
  }, [uuid]);

  return { details, setDetails, error, live };
}

function LossChart({ iterations }) {
  const { x, series } = useMemo(() => {
    const epochs = [...new Set(iterations.flatMap((it) => it.epochs.map((e) => e.epoch)))].sort((a, b) => a - b);
    return {
      x: epochs,
      series: iterations
        .filter((it) => it.epochs.length)
        .map((it) => {
          const byEpoch = new Map(it.epochs.map((e) => [e.epoch, e.avg_loss]));
          return { label: `iteration ${it.iteration}`, values: epochs.map((e) => byEpoch.get(e) ?? null) };
        }),
    };
  }, [iterations]);
  if (!series.length) return <p class="muted">No epoch reported yet.</p>;
  return <LineChart x={x} series={series} integerX xLabel="epoch" yLabel="avg loss" testId="loss-chart" />;
}

function EvalChart({ evals }) {
  const { x, series } = useMemo(() => {
    const rows = evals.slice().sort((a, b) => ts(a.evaluated_at) - ts(b.evaluated_at));
    const names = EVAL_METRICS.filter((m) => rows.some((r) => r[m] !== null && r[m] !== undefined));
    return {
      x: rows.map((r) => ts(r.evaluated_at)),
      series: names.map((m) => ({ label: m, values: rows.map((r) => r[m] ?? null) })),
    };
  }, [evals]);
  if (!series.length) return <p class="muted">No evaluation with accuracy, precision, recall, f1 or auc yet.</p>;
  return <LineChart x={x} series={series} time xLabel="evaluated at" yLabel="metric" testId="eval-chart" />;
}

function EvalTable({ evals }) {
  const extra = [...new Set(evals.flatMap((e) => Object.keys(e.metrics || {})))].slice(0, 4);
  return (
    <table class="compact">
      <thead>
        <tr>
          <th>Model</th>
          <th>Evaluated</th>
          {EVAL_METRICS.map((m) => (
            <th>{m}</th>
          ))}
          <th>loss</th>
          {extra.map((m) => (
            <th>{m}</th>
          ))}
        </tr>
      </thead>
      <tbody>
        {evals.map((e) => (
          <tr key={e.id}>
            <td class="mono">
              it {e.iteration} / ep {e.epoch}
            </td>
            <td>{fmtTime(e.evaluated_at)}</td>
            {EVAL_METRICS.map((m) => (
              <td>{fmtNum(e[m])}</td>
            ))}
            <td>{fmtNum(e.loss)}</td>
            {extra.map((m) => (
              <td>{typeof e.metrics?.[m] === "number" ? fmtNum(e.metrics[m]) : String(e.metrics?.[m] ?? "—")}</td>
            ))}
          </tr>
        ))}
      </tbody>
    </table>
  );
}

function ConfusionMatrix({ evaluation }) {
  const m = evaluation?.confusion_matrix;
  if (!m || !m.length) return <p class="muted">The latest evaluation has no confusion matrix.</p>;
  const max = Math.max(1, ...m.flat());
  return (
    <div>
      <p class="muted">
        Latest evaluation: iteration {evaluation.iteration}, epoch {evaluation.epoch} ({fmtTime(evaluation.evaluated_at)}).
        Rows: true class; columns: predicted.
      </p>
      <table class="confusion" data-testid="confusion-matrix">
        <thead>
          <tr>
            <th />
            {m[0].map((_, j) => (
              <th>pred {j}</th>
            ))}
          </tr>
        </thead>
        <tbody>
          {m.map((row, i) => (
            <tr>
              <th>true {i}</th>
              {row.map((v, j) => (
                <td
                  style={{ background: `rgba(37, 99, 235, ${(0.08 + (0.8 * v) / max).toFixed(3)})` }}
                  class={v / max > 0.55 ? "dark" : ""}
                  title={`true ${i}, predicted ${j}: ${v}`}
                >
                  {v}
                </td>
              ))}
            </tr>
          ))}
        </tbody>
      </table>
    </div>
  );
}

function Artifacts({ uuid, artifacts }) {
  if (!artifacts.length) return <p class="muted">No artifacts stored (yet).</p>;
  return (
    <table class="compact" data-testid="artifacts">
      <thead>
        <tr>
          <th>Name</th>
          <th>Size</th>
          <th>sha256</th>
          <th>Stored</th>
        </tr>
      </thead>
      <tbody>
        {artifacts.map((a) => (
          <tr key={a.id}>
            <td>
              <a href={artifactUrl(uuid, a.id)} download={a.name.split("/").pop()} title={a.uri}>
                {a.name}
              </a>
            </td>
            <td>{fmtBytes(a.size_bytes)}</td>
            <td class="mono" title={a.sha256}>
              {a.sha256.slice(0, 12)}
            </td>
            <td>{fmtTime(a.created_at)}</td>
          </tr>
        ))}
      </tbody>
    </table>
  );
}

function InstanceTimeline({ instances, now }) {
  if (!instances.length) return <p class="muted">No instance launched (yet).</p>;
  const rows = instances.map((i) => {
    const start = ts(i.launched_at) ?? ts(i.created_at);
    const end = ts(i.terminated_at);
    return { i, start, end, ready: ts(i.ready_at), open: end === null };
  });
  const t0 = Math.min(...rows.map((r) => r.start));
  const t1 = Math.max(t0 + 1, ...rows.map((r) => r.end ?? now));
  const W = 1000;
  const left = 260;
  const rowH = 34;
  const X = (t) => left + ((t - t0) / (t1 - t0)) * (W - left - 20);
  const H = rows.length * rowH + 30;
  return (
    <svg class="timeline" viewBox={`0 0 ${W} ${H}`} data-testid="instance-timeline" role="img">
      {rows.map((r, k) => {
        const y = k * rowH + 6;
        const x1 = X(r.start);
        const x2 = Math.max(x1 + 3, X(r.end ?? now));
        const label = `${r.i.name} · ${r.i.instance_type || r.i.provider}`;
        return (
          <g key={r.i.name + k}>
            <text x={4} y={y + 13} class="tl-name">
              {label.length > 40 ? `${label.slice(0, 39)}…` : label}
            </text>
            <text x={4} y={y + 26} class="tl-sub">
              {r.i.state}
              {r.i.spot ? " · spot" : ""} · {fmtCost(r.i.cost_usd)}
              {r.i.price_per_hour !== null ? ` (${fmtCost(r.i.price_per_hour)}/h)` : ""}
            </text>
            <rect x={x1} y={y + 4} width={x2 - x1} height={20} rx={3} class={`tl-bar state-${r.i.state}${r.open ? " open" : ""}`}>
              <title>
                {`${r.i.name} (${r.i.instance_id || "no id"}, ${r.i.region || "no region"}): ${r.i.state}` +
                  `${r.i.state_reason ? ` (${r.i.state_reason})` : ""}\nlaunched ${fmtTime(r.i.launched_at)}` +
                  `\nready ${fmtTime(r.i.ready_at)}\nterminated ${fmtTime(r.i.terminated_at)}` +
                  `\nbillable ${fmtDuration(r.i.billable_seconds)}, ${fmtCost(r.i.cost_usd)}`}
              </title>
            </rect>
            {r.ready !== null && <line x1={X(r.ready)} x2={X(r.ready)} y1={y + 2} y2={y + 26} class="tl-ready" />}
          </g>
        );
      })}
      <text x={left} y={H - 6} class="tl-axis">
        {fmtTime(new Date(t0 * 1000).toISOString())}
      </text>
      <text x={W - 20} y={H - 6} class="tl-axis" text-anchor="end">
        {rows.some((r) => r.open) ? "now" : fmtTime(new Date(t1 * 1000).toISOString())} ({fmtDuration(t1 - t0)})
      </text>
    </svg>
  );
}

function CancelButton({ job, onCancelled }) {
  const [asking, setAsking] = useState(false);
  const [busy, setBusy] = useState(false);
  const [message, setMessage] = useState(null);
  if (TERMINAL.has(job.status) && !message) return null;
  // window.confirm() is blocked in the Airflow UI's sandboxed iframe (no allow-modals): own dialog.
  const cancel = async () => {
    setBusy(true);
    try {
      const updated = await api(`jobs/${encodeURIComponent(job.uuid)}/cancel`, { method: "POST" });
      setMessage({ ok: true, text: `Cancelled: the trainer stops at its next status check.` });
      onCancelled(updated);
    } catch (err) {
      setMessage({ ok: false, text: explain(err) });
    } finally {
      setBusy(false);
      setAsking(false);
    }
  };
  return (
    <span class="cancel">
      {!TERMINAL.has(job.status) && (
        <button type="button" class="danger" data-testid="cancel" onClick={() => (setMessage(null), setAsking(true))}>
          Cancel job
        </button>
      )}
      {message && (
        <span class={message.ok ? "ok" : "error"} role="status" data-testid="cancel-message">
          {message.text}
        </span>
      )}
      {asking && (
        <div class="modal-backdrop">
          <div class="modal" role="dialog" aria-modal="true" data-testid="confirm-cancel">
            <p>
              Cancel job <b class="mono">{job.uuid}</b> ({job.project_id})? Its instances are terminated and the run
              fails.
            </p>
            <button type="button" class="danger" disabled={busy} onClick={cancel} data-testid="confirm-yes">
              Yes, cancel it
            </button>{" "}
            <button type="button" disabled={busy} onClick={() => setAsking(false)}>
              Keep it running
            </button>
          </div>
        </div>
      )}
    </span>
  );
}

export function JobView({ uuid }) {
  const { details, setDetails, error, live } = useJob(uuid);
  const [now, setNow] = useState(Date.now() / 1000);
  useEffect(() => {
    const t = setInterval(() => setNow(Date.now() / 1000), 1000);
    return () => clearInterval(t);
  }, []);

  if (!details) {
    return (
      <section>
        <p>
          <a href="#/">‹ All jobs</a>
        </p>
        {error ? <p class="error" role="alert">{error}</p> : <p>Loading…</p>}
      </section>
    );
  }
  const evals = details.iterations.flatMap((it) => it.evals);
  const latest = evals.reduce((a, b) => (a && ts(a.evaluated_at) >= ts(b.evaluated_at) ? a : b), null);
  const running = !TERMINAL.has(details.status);
  return (
    <section data-testid="job-view" data-status={details.status}>
      <p>
        <a href="#/">‹ All jobs</a>
      </p>
      <h1>
        {details.project_id} <span class="mono small">{details.uuid}</span>
      </h1>
      <div class="summary">
        <StatusBadge status={details.status} />
        {live && (
          <span class="live" data-testid="live">
            ● live
          </span>
        )}
        <span>
          {details.provider} / {details.runtime}
        </span>
        <span>GPU {details.gpu || "by price"}</span>
        {details.stage && <span data-testid="stage">stage {details.stage}</span>}
        <span>
          {fmtDuration(running ? jobDuration(details, now) : jobDuration(details))}
        </span>
        <span>{fmtCost(details.cost_usd)}</span>
        <span>created {fmtTime(details.created_at)}</span>
        <span class="muted">
          {details.dag_id} / {details.run_id}
        </span>
        <CancelButton job={details} onCancelled={(job) => setDetails((d) => ({ ...d, ...job }))} />
      </div>
      {error && <p class="error">{error}</p>}
      {details.failure_reason && <p class="error">Failed: {details.failure_reason}</p>}
      {details.non_finite_loss && <p class="warn">Non-finite loss: {details.non_finite_loss}</p>}

      <h2>Loss per iteration</h2>
      <LossChart iterations={details.iterations} />

      <h2>Evaluations</h2>
      <EvalChart evals={evals} />
      {evals.length > 0 && <EvalTable evals={evals} />}

      <h2>Confusion matrix</h2>
      <ConfusionMatrix evaluation={latest} />

      <h2>Artifacts</h2>
      <Artifacts uuid={details.uuid} artifacts={details.artifacts} />

      <h2>Instances</h2>
      <InstanceTimeline instances={details.instances} now={now} />
    </section>
  );
}
