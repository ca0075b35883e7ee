import { useMemo, useState } from "preact/hooks";
import { LineChart, PALETTE } from "./Chart.jsx";
import { useCompared } from "./data.js";
import { MetricSelect } from "./JobView.jsx";
import { StatusBadge } from "./JobsTable.jsx";
import { flatten, fmtCost, fmtDuration, fmtValue, trainingSeconds, wallSeconds } from "./format.js";
import { EVAL_METRICS, seriesChart } from "./metrics.js";
import { compareHref, jobHref, navigate } from "./router.js";

const short = (uuid) => uuid.slice(0, 8);

/** Rows of the side-by-side table: [key, values per job]; differing rows first within a section. */
function rowsOf(list, pick) {
  const perJob = list.map((d) => new Map(flatten(pick(d))));
  const keys = [...new Set(perJob.flatMap((m) => [...m.keys()]))].sort();
  return keys.map((k) => {
    const values = perJob.map((m) => (m.has(k) ? m.get(k) : undefined));
    const shown = values.map((v) => (v === undefined ? "" : JSON.stringify(v)));
    return { key: k, values, differs: new Set(shown).size > 1 };
  });
}

function SideBySide({ list, sections, onlyDiffs }) {
  return (
    <div class="scroll-x">
      <table class="compact side-by-side" data-testid="compare-params">
        <thead>
          <tr>
            <th />
            {list.map((d, i) => (
              <th style={{ color: PALETTE[i % PALETTE.length] }}>
                <a href={jobHref(d.uuid)} class="mono">
                  {short(d.uuid)}
                </a>
              </th>
            ))}
          </tr>
        </thead>
        {sections.map(({ title, rows }) => {
          const shown = onlyDiffs ? rows.filter((r) => r.differs) : rows;
          return (
            <tbody key={title}>
              <tr class="section">
                <th colSpan={list.length + 1}>
                  {title} <span class="small muted">({rows.filter((r) => r.differs).length} differ)</span>
                </th>
              </tr>
              {shown.map((r) => (
                <tr key={r.key} data-key={r.key} data-differs={String(r.differs)} class={r.differs ? "differs" : ""}>
                  <th class="mono">{r.key}</th>
                  {r.values.map((v) => (
                    <td class="mono">
                      {v === undefined ? <span class="muted">—</span> : v === "" ? <span class="muted">""</span> : fmtValue(v)}
                    </td>
                  ))}
                </tr>
              ))}
            </tbody>
          );
        })}
      </table>
    </div>
  );
}

/** Jobs side by side (#/compare?jobs=<uuid>,<uuid>&metric=): one metric's curves overlaid, then
 * results, hyperparameters and params with what differs highlighted. */
export function Compare({ query = {} }) {
  const uuids = (query.jobs || "").split(",").map((u) => u.trim()).filter(Boolean);
  const { list, series, names, metric, error } = useCompared(uuids, query.metric);
  const [onlyDiffs, setOnlyDiffs] = useState(false);
  const curves = useMemo(
    () =>
      list && series
        ? seriesChart(
            list.map((d, i) => ({
              prefix: short(d.uuid),
              series: series[i],
              live: [],
              color: PALETTE[i % PALETTE.length],
            })),
            metric,
          )
        : null,
    [list, series, metric],
  );
  const back = (
    <p>
      <a href="#/">‹ All jobs</a>
    </p>
  );
  if (uuids.length < 2) {
    return (
      <section data-testid="compare">
        {back}
        <p class="muted">Tick two or more jobs in the jobs table to compare them.</p>
      </section>
    );
  }
  if (!list) {
    return (
      <section data-testid="compare">
        {back}
        {error ? <p class="error" role="alert">{error}</p> : <p>Loading {uuids.length} jobs…</p>}
      </section>
    );
  }
  const now = Date.now() / 1000;
  const results = rowsOf(list, (d) => {
    const last = d.latest_evaluation;
    const out = {};
    for (const m of [...EVAL_METRICS, "loss"]) if (last && typeof last[m] === "number") out[`last evaluation.${m}`] = last[m];
    return out;
  });
  const sections = [
    { title: "Results", rows: results },
    { title: "Hyperparameters (config)", rows: rowsOf(list, (d) => ({ config: d.params?.config || {} })) },
    {
      title: "Params",
      rows: rowsOf(list, (d) => {
        const { config, ...rest } = d.params || {};
        return rest;
      }),
    },
  ];
  return (
    <section data-testid="compare">
      {back}
      <h1>Comparing {list.length} jobs</h1>
      <div class="scroll-x">
        <table class="compact" data-testid="compare-jobs">
          <thead>
            <tr>
              <th />
              <th>Job</th>
              <th>Status</th>
              <th>Project</th>
              <th>Provider</th>
              <th>Wall time</th>
              <th>Training</th>
              <th>Cost</th>
              <th>Run</th>
            </tr>
          </thead>
          <tbody>
            {list.map((d, i) => (
              <tr key={d.uuid} data-job={d.uuid}>
                <td>
                  <span class="swatch" style={{ background: PALETTE[i % PALETTE.length] }} />
                </td>
                <td>
                  <a href={jobHref(d.uuid)} class="mono">
                    {short(d.uuid)}
                  </a>
                </td>
                <td>
                  <StatusBadge status={d.status} />
                </td>
                <td>{d.project_id}</td>
                <td>{d.provider}</td>
                <td>{fmtDuration(wallSeconds(d, now))}</td>
                <td>{fmtDuration(trainingSeconds(d, now))}</td>
                <td>{fmtCost(d.cost_usd)}</td>
                <td class="mono small">
                  {d.dag_id} / {d.run_id}
                  {d.stage ? ` / ${d.stage}${d.map_index >= 0 ? ` #${d.map_index}` : ""}` : ""}
                </td>
              </tr>
            ))}
          </tbody>
        </table>
      </div>

      <h2>Per-epoch metrics</h2>
      {!series || series.some((s) => s.metric !== metric) ? (
        <p class="muted">Loading {metric}…</p>
      ) : curves && curves.series.length ? (
        <>
          <div class="chart-head">
            <MetricSelect
              names={names}
              value={metric}
              onChange={(m) => navigate(compareHref(uuids, { metric: m }), { replace: true })}
            />
          </div>
          <LineChart x={curves.x} series={curves.series} integerX xLabel="epoch" yLabel={metric} testId="compare-chart" />
        </>
      ) : (
        <p class="muted">None of these jobs reported an epoch.</p>
      )}

      <h2>Side by side</h2>
      <label class="small">
        <input type="checkbox" checked={onlyDiffs} onChange={(ev) => setOnlyDiffs(ev.currentTarget.checked)} /> only what
        differs
      </label>
      <SideBySide list={list} sections={sections} onlyDiffs={onlyDiffs} />
    </section>
  );
}
