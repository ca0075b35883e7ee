import { useEffect, useMemo, useRef, useState } from "preact/hooks";
import { TERMINAL, api, artifactUrl, explain } from "./api.js";
import { LineChart } from "./Chart.jsx";
import { EVALS_SHOWN, useJobData, useLog } from "./data.js";
import { StatusBadge } from "./JobsTable.jsx";
import {
  flatten,
  fmtBytes,
  fmtCost,
  fmtDuration,
  fmtTime,
  fmtValue,
  trainingSeconds,
  ts,
  wallSeconds,
} from "./format.js";
import { EVAL_METRICS, evalPoints, latestEval, seriesChart } from "./metrics.js";
import { STEP_TASK_IDS, dagRunUrl, href, navigate, runHref, taskId, taskUrl } from "./router.js";

const UPLOADED_LOG = "logs/trainer.log";
/** Folders of artifacts shown collapsed: many files nobody reads one by one. */
const COLLAPSED_FOLDERS = new Set(["checkpoints"]);
const COLLAPSE_OVER = 12;

/** A labelled fact of the header. */
function Fact({ label, testId, title, children }) {
  return (
    <span class="fact" data-testid={testId} title={title}>
      <span class="fact-label">{label}</span> <span class="fact-value">{children}</span>
    </span>
  );
}

/** Instance types the job ran on (the latest launch attempt's first), once each. */
function instanceTypes(instances) {
  const launched = instances.filter((i) => i.launched_at || i.state === "running" || i.state === "terminated");
  const types = (launched.length ? launched : instances).map((i) => i.instance_type).filter(Boolean);
  return [...new Set(types.reverse())];
}

/** "8x H100" of the latest launched instance (what the offer had), "" when none says. */
function instanceGpus(instances) {
  const launched = instances.filter((i) => i.gpu_name);
  const last = launched[launched.length - 1];
  if (!last) return "";
  return last.gpu_count > 1 ? `${last.gpu_count}x ${last.gpu_name}` : last.gpu_name;
}

function JobHeader({ details, live, now, onCancelled }) {
  const ended = TERMINAL.has(details.status);
  const types = instanceTypes(details.instances);
  const nodes = new Set(details.instances.map((i) => i.node_rank)).size;
  const local = details.provider === "local";
  const reason = details.failure_reason;
  return (
    <>
      <div class="summary" data-testid="job-header">
        <StatusBadge status={details.status} />
        {live && (
          <span class="live" data-testid="live">
            ● live
          </span>
        )}
        <Fact label="Wall time" testId="wall-duration" title="created → ended (now, while the job runs)">
          {fmtDuration(wallSeconds(details, now))}
        </Fact>
        <Fact label="Training time" testId="training-duration" title="the trainer's PROJECT start → end">
          {fmtDuration(trainingSeconds(details, now))}
        </Fact>
        <Fact label="Cost" testId="cost">
          {fmtCost(details.cost_usd)}
        </Fact>
        <Fact label="Provider" testId="provider">
          {details.provider} / {details.runtime}
        </Fact>
        {types.length > 0 && (
          <Fact label="Instance" testId="instance-type">
            {types.join(", ")}
            {nodes > 1 ? ` × ${nodes} nodes` : ""}
          </Fact>
        )}
        {!local && (
          <Fact
            label="GPU"
            testId="gpu"
            title={`the GPUs of the instance launched; asked for: ${details.gpu || "any (the cheapest offer that fits)"}`}
          >
            {instanceGpus(details.instances) || details.gpu || "any (cheapest offer)"}
          </Fact>
        )}
        {details.stage && (
          <Fact label={details.map_index >= 0 ? "Trial" : "Stage"} testId="stage">
            {details.stage}
            {details.map_index >= 0 ? ` #${details.map_index}` : ""}
          </Fact>
        )}
        <Fact label="Created">{fmtTime(details.created_at)}</Fact>
        {details.cancelled_by && (
          <Fact label="Cancelled by" testId="cancelled-by">
            {details.cancelled_by}
          </Fact>
        )}
        <CancelButton job={details} onCancelled={onCancelled} />
      </div>
      <AirflowLinks job={details} />
      {reason && (
        <div class={`reason-box ${details.status === "failed" ? "error" : "warn"}`} data-testid="failure-reason">
          <b>{details.status === "failed" ? "Failure reason" : ended ? "Reason" : "Note"}:</b> <span>{reason}</span>
        </div>
      )}
      {details.non_finite_loss && <p class="warn">Non-finite loss: {details.non_finite_loss}</p>}
    </>
  );
}

/** The dag run and each step's task log in the Airflow UI (the page is in Airflow's iframe: the
 * top window goes there). */
function AirflowLinks({ job }) {
  return (
    <div class="links" data-testid="airflow-links">
      <span>
        <span class="fact-label">Dag run</span>{" "}
        <a href={dagRunUrl(job.dag_id, job.run_id)} target="_top" data-testid="dag-run-link" class="mono">
          {job.dag_id} / {job.run_id}
        </a>{" "}
        <a href={runHref(job.dag_id, job.run_id)} class="small" title="every training job of this dag run">
          (its training jobs)
        </a>
      </span>
      <span>
        <span class="fact-label">Task logs</span>{" "}
        {STEP_TASK_IDS.map((step, i) => (
          <>
            {i > 0 && <span class="muted"> · </span>}
            <a
              href={taskUrl(job.dag_id, job.run_id, taskId(job.stage, step), job.map_index)}
              target="_top"
              class="task-link small"
              data-testid="task-link"
              data-task={step}
            >
              {step}
            </a>
          </>
        ))}
      </span>
    </div>
  );
}

export function MetricSelect({ names, value, onChange }) {
  if (names.length < 2) return null;
  return (
    <label class="metric-select">
      Metric{" "}
      <select value={value} onChange={(ev) => onChange(ev.currentTarget.value)} data-testid="metric-select">
        {names.map((n) => (
          <option value={n}>{n}</option>
        ))}
      </select>
    </label>
  );
}

/** The per-epoch metric chart: the series the API downsampled, then the epochs the stream brought. */
function EpochMetrics({ series, live, names, metric, onMetric }) {
  const { x, series: curves } = useMemo(() => seriesChart([{ prefix: "", series, live }], metric), [series, live, metric]);
  if (series === null) return <p class="muted">Loading…</p>;
  if (!names.length) return <p class="muted">No epoch reported yet.</p>;
  const loading = series.metric !== metric;
  const drawn = series.iterations.length;
  const downsampled = series.iterations.some((it) => it.counts.some((c) => c > 1));
  return (
    <>
      <div class="chart-head">
        <MetricSelect names={names} value={metric} onChange={onMetric} />
        <span class="small muted">
          {names.length} per-epoch metric{names.length > 1 ? "s" : ""} stored
        </span>
        {(downsampled || series.iterations_total > drawn) && (
          <span class="small muted" data-testid="chart-note">
            {series.epochs_total.toLocaleString("en-US")} epochs
            {series.iterations_total > drawn ? `, the last ${drawn} of ${series.iterations_total} iterations` : ""}
            {downsampled ? `; each point the last epoch of up to ${Math.max(...series.iterations.flatMap((it) => it.counts))}, shaded from their lowest to highest` : ""}
          </span>
        )}
      </div>
      {loading ? (
        <p class="muted">Loading {metric}…</p>
      ) : curves.length ? (
        <LineChart x={x} series={curves} integerX xLabel="epoch" yLabel={metric} testId="loss-chart" />
      ) : (
        <p class="muted">No epoch reported {metric} yet.</p>
      )}
    </>
  );
}

function EvalChart({ evals }) {
  const { x, series, labels, byIteration } = useMemo(() => {
    const { rows, labels: l, byIteration: b } = evalPoints(evals);
    const names = EVAL_METRICS.filter((m) => rows.some((r) => typeof r[m] === "number"));
    return {
      x: rows.map((_, i) => i),
      labels: l,
      byIteration: b,
      series: names.map((m) => ({ label: m, values: rows.map((r) => (typeof r[m] === "number" ? r[m] : null)) })),
    };
  }, [evals]);
  if (!series.length) return <p class="muted">No evaluation with accuracy, precision, recall, f1 or auc yet.</p>;
  return (
    <LineChart
      x={x}
      xLabels={labels}
      series={series}
      xLabel={byIteration ? "evaluation (iteration/epoch)" : "evaluation (epoch)"}
      yLabel="metric"
      testId="eval-chart"
    />
  );
}

/** The table shows the latest this many evaluations. */
const EVAL_TABLE_ROWS = 200;

function EvalTable({ evals }) {
  const rows = evalPoints(evals).rows.slice(-EVAL_TABLE_ROWS);
  const extra = [
    ...new Set(rows.flatMap((e) => Object.keys(e.metrics || {}).filter((k) => typeof e.metrics[k] !== "object"))),
  ]
    .filter((k) => !EVAL_METRICS.includes(k) && k !== "loss")
    .slice(0, 6);
  return (
    <div class="scroll-x">
      <table class="compact numbers" data-testid="eval-table">
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
          {rows.map((e) => (
            <tr key={e.id}>
              <td class="mono">
                it {e.iteration} / ep {e.epoch}
              </td>
              <td>{fmtTime(e.evaluated_at)}</td>
              {EVAL_METRICS.map((m) => (
                <td>{fmtValue(e[m])}</td>
              ))}
              <td>{fmtValue(e.loss)}</td>
              {extra.map((m) => (
                <td>{fmtValue(e.metrics?.[m])}</td>
              ))}
            </tr>
          ))}
        </tbody>
      </table>
    </div>
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

/** Key/value rows of a (flattened) object. */
function KeyValues({ entries, testId, empty }) {
  if (!entries.length) return <p class="muted">{empty}</p>;
  return (
    <table class="compact kv" data-testid={testId}>
      <tbody>
        {entries.map(([k, v]) => (
          <tr key={k} data-key={k}>
            <th class="mono">{k}</th>
            <td class="mono">{v === "" ? <span class="muted">""</span> : fmtValue(v)}</td>
          </tr>
        ))}
      </tbody>
    </table>
  );
}

function Params({ details }) {
  const params = details.params || {};
  const { config, ...rest } = params;
  const hyper = flatten(config || {});
  const others = flatten(rest).sort(([a], [b]) => a.localeCompare(b));
  // The training config starts as the config param; shown when the trainer reported another one.
  const same = (a, b) => JSON.stringify(flatten(a).sort()) === JSON.stringify(flatten(b).sort());
  const tc = details.training_config;
  const reported = tc && Object.keys(tc).length && !same(tc, config || {}) ? tc : null;
  return (
    <div class="two-columns">
      <div>
        <h3>Hyperparameters</h3>
        <KeyValues entries={hyper} testId="hyperparameters" empty="No hyperparameters (the config param is empty)." />
        {reported && (
          <details class="reported">
            <summary>Training config the trainer reported</summary>
            <KeyValues entries={flatten(reported)} testId="training-config" empty="" />
          </details>
        )}
      </div>
      <div>
        <h3>Params</h3>
        <KeyValues entries={others} testId="params" empty="No params recorded." />
      </div>
    </div>
  );
}

const LOG_SOURCES = {
  live: "live: the trainer log's last lines, as the job writes them",
  uploaded: "the uploaded logs/trainer.log",
  none: "no log yet",
};

function LogPanel({ details }) {
  const running = !TERMINAL.has(details.status);
  const uploaded = details.artifacts.find((a) => a.name === UPLOADED_LOG);
  const [log, error] = useLog(details.uuid, { running, version: `${details.status} ${uploaded?.id ?? ""}` });
  const box = useRef(null);
  const pinned = useRef(true); // follows the end until the reader scrolls up
  useEffect(() => {
    const el = box.current;
    if (el && pinned.current) el.scrollTop = el.scrollHeight;
  }, [log]);
  const source = log?.source ?? "none";
  let note = LOG_SOURCES[source];
  if (source === "live" && TERMINAL.has(details.status)) note = "the last lines kept while the job ran";
  return (
    <div data-testid="log-panel" data-source={log ? source : ""}>
      <p class="small muted">
        <span data-testid="log-source">{log ? note : "Loading…"}</span>
        {log?.updated_at && source === "live" ? ` (stored ${fmtTime(log.updated_at)})` : ""}
        {log?.truncated ? ` · the last ${log.lines.length} lines` : ""}
        {uploaded && (
          <>
            {" · "}
            <a href={artifactUrl(details.uuid, uploaded.id)} download="trainer.log">
              whole log ({fmtBytes(uploaded.size_bytes)})
            </a>
          </>
        )}
        {log?.detail ? <span class="warn"> · {log.detail}</span> : ""}
      </p>
      {error && <p class="error">{error}</p>}
      {log && log.lines.length > 0 && (
        <pre
          class="log"
          ref={box}
          data-testid="log-lines"
          onScroll={(ev) => {
            const el = ev.currentTarget;
            pinned.current = el.scrollTop + el.clientHeight >= el.scrollHeight - 8;
          }}
        >
          {log.lines.join("\n")}
        </pre>
      )}
    </div>
  );
}

/** Artifacts by folder: a folder of files is one row (collapsed for checkpoints and big folders)
 * that opens to its files. */
function Artifacts({ uuid, artifacts }) {
  const groups = useMemo(() => {
    const byFolder = new Map();
    for (const a of artifacts) {
      const cut = a.name.lastIndexOf("/");
      const folder = cut < 0 ? "" : a.name.slice(0, cut);
      if (!byFolder.has(folder)) byFolder.set(folder, []);
      byFolder.get(folder).push(a);
    }
    return [...byFolder.entries()].sort(([a], [b]) => (a === "" ? -1 : b === "" ? 1 : a.localeCompare(b)));
  }, [artifacts]);
  const [open, setOpen] = useState({});
  if (!artifacts.length) return <p class="muted">No artifacts stored (yet).</p>;
  const total = artifacts.reduce((n, a) => n + (a.size_bytes || 0), 0);
  return (
    <>
      <p class="small muted">
        {artifacts.length} files, {fmtBytes(total)}
      </p>
      <table class="compact artifacts" data-testid="artifacts">
        <thead>
          <tr>
            <th>Name</th>
            <th>Size</th>
            <th>sha256</th>
            <th>Stored</th>
          </tr>
        </thead>
        <tbody>
          {groups.map(([folder, files]) => {
            const collapsedByDefault = COLLAPSED_FOLDERS.has(folder.split("/")[0]) || files.length > COLLAPSE_OVER;
            const shown = folder === "" || (open[folder] ?? !collapsedByDefault);
            const size = files.reduce((n, a) => n + (a.size_bytes || 0), 0);
            return [
              folder !== "" && (
                <tr
                  key={`folder:${folder}`}
                  class="folder"
                  data-testid="artifact-folder"
                  data-folder={folder}
                  data-open={String(shown)}
                  onClick={() => setOpen({ ...open, [folder]: !shown })}
                >
                  <td colSpan={4}>
                    <button type="button" class="link" aria-expanded={String(shown)}>
                      {shown ? "▾" : "▸"} {folder}/
                    </button>{" "}
                    <span class="small muted">
                      {files.length} file{files.length > 1 ? "s" : ""}, {fmtBytes(size)}
                    </span>
                  </td>
                </tr>
              ),
              ...(shown
                ? files.map((a) => (
                    <tr key={a.id} class={folder ? "in-folder" : ""}>
                      <td>
                        <a
                          href={artifactUrl(uuid, a.id)}
                          download={a.name.split("/").pop()}
                          title={`${a.name}\n${a.uri}`}
                          data-name={a.name}
                        >
                          {folder ? a.name.slice(folder.length + 1) : a.name}
                        </a>
                      </td>
                      <td>{fmtBytes(a.size_bytes)}</td>
                      <td class="mono" title={a.sha256}>
                        {a.sha256.slice(0, 12)}
                      </td>
                      <td>{fmtTime(a.created_at)}</td>
                    </tr>
                  ))
                : []),
            ];
          })}
        </tbody>
      </table>
    </>
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

/** Ticks every second while ``on``: the running job's durations. */
function useNow(on) {
  const [now, setNow] = useState(Date.now() / 1000);
  useEffect(() => {
    if (!on) return undefined;
    const t = setInterval(() => setNow(Date.now() / 1000), 1000);
    return () => clearInterval(t);
  }, [on]);
  return on ? now : Date.now() / 1000;
}

/** One job (#/jobs/<uuid>; also shown in place by the run view, ``back`` then says where to). */
export function JobView({ uuid, query = {}, back = null, routeFor = null }) {
  const { details, setDetails, error, live, series, liveEpochs, evals, names, metric } = useJobData(uuid, query.metric);
  const running = details ? !TERMINAL.has(details.status) : false;
  const now = useNow(running || !details);
  // The metric is part of the URL (shareable); in the run view, of the run view's URL.
  const onMetric = (metric) => navigate(routeFor ? routeFor({ ...query, metric }) : href(["jobs", uuid], { metric }), { replace: true });
  const backLink = back ?? (
    <p>
      <a href="#/">‹ All jobs</a>
    </p>
  );

  if (!details) {
    return (
      <section>
        {backLink}
        {error ? <p class="error" role="alert">{error}</p> : <p>Loading…</p>}
      </section>
    );
  }
  const evalsTotal = Math.max(details.evals_total ?? 0, evals.length);
  return (
    <section data-testid="job-view" data-status={details.status} data-uuid={details.uuid}>
      {backLink}
      <h1>
        {details.project_id} <span class="mono small">{details.uuid}</span>
      </h1>
      <JobHeader details={details} live={live} now={now} onCancelled={(job) => setDetails((d) => ({ ...d, ...job }))} />
      {error && <p class="error">{error}</p>}

      <h2>Per-epoch metrics</h2>
      <EpochMetrics series={series} live={liveEpochs} names={names} metric={metric} onMetric={onMetric} />

      <h2>Evaluations</h2>
      {evalsTotal > evals.length && (
        <p class="small muted" data-testid="evals-note">
          The latest {evals.length.toLocaleString("en-US")} of {evalsTotal.toLocaleString("en-US")} evaluations
          {evals.length > EVAL_TABLE_ROWS ? ` (the table: the latest ${EVAL_TABLE_ROWS})` : ""}.
        </p>
      )}
      <EvalChart evals={evals} />
      {evals.length > 0 && <EvalTable evals={evals} />}

      <h2>Confusion matrix</h2>
      <ConfusionMatrix evaluation={latestEval(evals) ?? details.latest_evaluation} />

      <h2>Trainer log</h2>
      <LogPanel details={details} />

      <h2>Hyperparameters and params</h2>
      <Params details={details} />

      <h2>Artifacts</h2>
      <Artifacts uuid={details.uuid} artifacts={details.artifacts} />

      <h2>Instances</h2>
      <InstanceTimeline instances={details.instances} now={now} />
    </section>
  );
}
