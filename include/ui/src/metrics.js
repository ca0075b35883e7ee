// What the charts plot: the per-epoch metrics a job stored (epoch_train.avg_loss and every number
// of its `metrics`) and its evaluations, by iteration and epoch. A job's epochs come as a series the
// API downsampled (GET /v1/jobs/<uuid>/series: per iteration, each bucket's last epoch with its
// value, lowest and highest), plus the epoch rows the stream brought since.

export const EVAL_METRICS = ["accuracy", "precision", "recall", "f1", "auc"];
export const DEFAULT_METRIC = "avg_loss";

const isNumber = (v) => typeof v === "number" && Number.isFinite(v);

/** The value of one per-epoch metric of an epoch row (null when it has none). */
export function epochValue(row, name) {
  const v = name === "avg_loss" ? row.avg_loss : row.metrics?.[name];
  return isNumber(v) ? v : null;
}

/** The metric to plot: `wanted` when the job stored it, else avg_loss (or the first one stored). */
export function chosenMetric(names, wanted) {
  if (wanted && names.includes(wanted)) return wanted;
  return names.includes(DEFAULT_METRIC) ? DEFAULT_METRIC : names[0];
}

/** The metrics of a series and of the epoch rows that came after it, in the series' order
 * (avg_loss first, then by name). */
export function metricNames(series, live) {
  const names = new Set([...(series?.metrics ?? []), ...epochMetricNames([{ epochs: live ?? [] }])]);
  const rest = [...names].filter((n) => n !== DEFAULT_METRIC).sort();
  return [...(names.has(DEFAULT_METRIC) ? [DEFAULT_METRIC] : []), ...rest];
}

/** Every numeric per-epoch metric stored in these iterations: avg_loss first, then by name. */
export function epochMetricNames(iterations) {
  const names = new Set();
  let loss = false;
  for (const it of iterations) {
    for (const e of it.epochs) {
      if (isNumber(e.avg_loss)) loss = true;
      for (const [k, v] of Object.entries(e.metrics || {})) if (isNumber(v)) names.add(k);
    }
  }
  names.delete("avg_loss");
  return [...(loss ? ["avg_loss"] : []), ...[...names].sort()];
}

/** At most this many iterations are drawn (the last ones, as the API's series holds). */
export const MAX_CHART_ITERATIONS = 50;

/** The points of each iteration of one job: its series (when it is of `metric`), then the epochs of
 * `live` (rows from the stream) after the series' last epoch of their iteration. Point: {epoch,
 * value, low, high}; `downsampled`: some point stands for several epochs. */
export function iterationPoints(series, live, metric) {
  const byIteration = new Map();
  if (series && series.metric === metric) {
    for (const it of series.iterations) {
      byIteration.set(it.iteration, {
        iteration: it.iteration,
        downsampled: it.counts.some((c) => c > 1),
        points: it.epochs.map((epoch, i) => ({ epoch, value: it.values[i], low: it.low[i], high: it.high[i] })),
      });
    }
  }
  const rows = (live ?? []).slice().sort((a, b) => a.iteration - b.iteration || a.epoch - b.epoch);
  for (const row of rows) {
    if (!byIteration.has(row.iteration)) byIteration.set(row.iteration, { iteration: row.iteration, downsampled: false, points: [] });
    const it = byIteration.get(row.iteration);
    const last = it.points.length ? it.points[it.points.length - 1].epoch : -Infinity;
    if (row.epoch <= last) continue; // already in the series (or sent twice)
    const value = epochValue(row, metric);
    it.points.push({ epoch: row.epoch, value, low: value, high: value });
  }
  return [...byIteration.values()].sort((a, b) => a.iteration - b.iteration).slice(-MAX_CHART_ITERATIONS);
}

/** x (every epoch drawn) and the curves of each job's iterations, from their series: {label, values,
 * color?, dash?}, and where a point stands for several epochs the band of their lowest and highest
 * (two more curves, `role` "high" and "low", right after their iteration's). `jobs`: [{prefix,
 * series, live, color?}] (prefix: "" for one job). */
export function seriesChart(jobs, metric) {
  const perJob = jobs.map((job) => ({ job, iterations: iterationPoints(job.series, job.live, metric) }));
  const epochs = new Set();
  for (const { iterations } of perJob) for (const it of iterations) for (const p of it.points) epochs.add(p.epoch);
  const x = [...epochs].sort((a, b) => a - b);
  const series = [];
  for (const { job, iterations } of perJob) {
    const drawn = iterations.filter((it) => it.points.some((p) => isNumber(p.value) || isNumber(p.high)));
    drawn.forEach((it, k) => {
      const byEpoch = new Map(it.points.map((p) => [p.epoch, p]));
      const at = (key) => x.map((ep) => (isNumber(byEpoch.get(ep)?.[key]) ? byEpoch.get(ep)[key] : null));
      const name = drawn.length > 1 || !job.prefix ? `iteration ${it.iteration}` : "";
      const label = [job.prefix, name].filter(Boolean).join(" ");
      const dash = job.color && k > 0 ? [6, 4] : undefined;
      series.push({ label, values: at("value"), color: job.color, dash });
      if (it.downsampled) {
        series.push({ label: `${label} high`, values: at("high"), color: job.color, role: "high" });
        series.push({ label: `${label} low`, values: at("low"), color: job.color, role: "low" });
      }
    });
  }
  return { x, series };
}

/** Evaluations in training order (iteration, then epoch), with a label each: "ep 5", or "1/5"
 * (iteration/epoch) when the job has several iterations; epoch 0 (none named): "it 1". */
export function evalPoints(evals) {
  const rows = evals.slice().sort((a, b) => a.iteration - b.iteration || a.epoch - b.epoch || a.id - b.id);
  const iterations = new Set(rows.map((r) => r.iteration)).size;
  const label = (r) => {
    if (!r.epoch) return `it ${r.iteration}`;
    return iterations > 1 ? `${r.iteration}/${r.epoch}` : `ep ${r.epoch}`;
  };
  return { rows, labels: rows.map(label), byIteration: iterations > 1 };
}

/** The latest evaluation (by iteration, then epoch). */
export function latestEval(evals) {
  const { rows } = evalPoints(evals);
  return rows.length ? rows[rows.length - 1] : null;
}

/** Evaluations (or epochs) in checkpoint order: iteration, epoch, then as stored. */
const byCheckpoint = (a, b) => a.iteration - b.iteration || a.epoch - b.epoch || a.id - b.id;

/** `rows` and `more` (rows have ids) once each, in checkpoint order, the latest `max` kept. */
export function mergeRows(rows, more, max) {
  const byId = new Map(rows.map((r) => [r.id, r]));
  let added = false;
  for (const r of more) {
    if (!byId.has(r.id)) added = true;
    byId.set(r.id, r);
  }
  if (!added && byId.size === rows.length) return rows;
  const out = [...byId.values()].sort(byCheckpoint);
  return out.length > max ? out.slice(out.length - max) : out;
}
