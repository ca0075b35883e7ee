// What the charts plot: the per-epoch metrics a job stored (epoch_train.avg_loss and every number
// of its `metrics`) and its evaluations, by iteration and epoch.

export const EVAL_METRICS = ["accuracy", "precision", "recall", "f1", "auc"];
export const DEFAULT_METRIC = "avg_loss";

const isNumber = (v) => typeof v === "number" && Number.isFinite(v);

/** The value of one per-epoch metric of an epoch row (null when it has none). */
export function epochValue(row, name) {
  const v = name === "avg_loss" ? row.avg_loss : row.metrics?.[name];
  return isNumber(v) ? v : null;
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

/** x (every epoch number seen) and one series per iteration of each job: {label, values}.
 * `jobs`: [{prefix, iterations, color?}] (prefix: "" for one job). */
export function epochSeries(jobs, metric) {
  const epochs = new Set();
  for (const job of jobs) for (const it of job.iterations) for (const e of it.epochs) epochs.add(e.epoch);
  const x = [...epochs].sort((a, b) => a - b);
  const series = [];
  for (const job of jobs) {
    const withEpochs = job.iterations.filter((it) => it.epochs.length);
    withEpochs.forEach((it, k) => {
      const byEpoch = new Map(it.epochs.map((e) => [e.epoch, epochValue(e, metric)]));
      const name = withEpochs.length > 1 || !job.prefix ? `iteration ${it.iteration}` : "";
      series.push({
        label: [job.prefix, name].filter(Boolean).join(" "),
        values: x.map((ep) => byEpoch.get(ep) ?? null),
        color: job.color,
        // One colour per job (compared jobs): its later iterations dashed.
        dash: job.color && k > 0 ? [6, 4] : undefined,
      });
    });
  }
  return { x, series: series.filter((s) => s.values.some((v) => v !== null)) };
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
