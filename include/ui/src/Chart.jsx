import { useEffect, useRef } from "preact/hooks";
import uPlot from "uplot";
import "uplot/dist/uPlot.min.css";
import { fmtValue } from "./format.js";

export const PALETTE = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#db2777", "#4b5563"];

const lastFinite = (values) => {
  for (let i = values.length - 1; i >= 0; i--) if (values[i] !== null && Number.isFinite(values[i])) return i;
  return null;
};

/** The legend shows each series' latest value while the cursor is off the plot (uPlot shows "--"
 * there): set after every legend update that has no cursor (drawn, new data, mouse left). */
function showLatest(u) {
  if (u.cursor.idx !== null && u.cursor.idx !== undefined) return;
  const idxs = u.series.map((_, i) => (i === 0 ? null : lastFinite(u.data[i])));
  const latest = idxs.reduce((m, i) => (i !== null && (m === null || i > m) ? i : m), null);
  idxs[0] = latest;
  u.setLegend({ idxs }, false);
}

/** The x range, from the data (sorted x; uPlot widens a single x value on its own before asking):
 * room for the points at both ends, one point (one epoch, one evaluation) in the middle. */
function xRange(xs, ordinal) {
  const min = xs.length ? xs[0] : null;
  const max = xs.length ? xs[xs.length - 1] : null;
  if (min === null || max === null) return [0, 1];
  if (ordinal || min === max) return [min - 0.5, max + 0.5];
  const pad = Math.max(0.2, (max - min) * 0.03);
  return [min - pad, max + pad];
}

/** A colour with some transparency (#rrggbb -> rgba). */
function faded(hex, alpha) {
  const n = parseInt(hex.slice(1), 16);
  return `rgba(${(n >> 16) & 255}, ${(n >> 8) & 255}, ${n & 255}, ${alpha})`;
}

/** Each series' colour: its own, else the palette's by its place among the curves; a band's edges
 * (`role` high/low) take the colour of the curve before them. */
function colours(series) {
  let curve = -1;
  let last = PALETTE[0];
  return series.map((s) => {
    if (!s.role) {
      curve += 1;
      last = s.color || PALETTE[curve % PALETTE.length];
    }
    return s.role ? s.color || last : last;
  });
}

/**
 * A uPlot line chart. `x`: the x values; `series`: [{label, values, color?, role?}] aligned with `x`
 * (null: no point). A curve may be followed by the two edges of its band (`role` "high" then "low":
 * a downsampled curve's lowest and highest), drawn faint with the band filled between them and left
 * out of the legend. `xLabels` (aligned with `x` = 0, 1, 2, ...): an ordinal axis with these tick
 * labels (evaluations by iteration/epoch); else `integerX` for whole-number ticks (epochs).
 * `data-points` on the wrapper counts the finite points drawn on the curves (the e2e test reads it).
 */
export function LineChart({ x, series, xLabel, yLabel, integerX = false, xLabels = null, height = 260, testId }) {
  const box = useRef(null);
  const plot = useRef(null);
  const labels = useRef(xLabels);
  labels.current = xLabels;
  const ordinal = xLabels !== null;
  const shape = series.map((s) => `${s.label}\u0001${s.color || ""}\u0001${s.dash || ""}\u0001${s.role || ""}`).join("\u0000");
  const few = x.length <= 3;

  useEffect(() => {
    const el = box.current;
    const colors = colours(series);
    const css = getComputedStyle(document.documentElement);
    const ink = css.getPropertyValue("--muted").trim() || "#6b7280";
    const rule = css.getPropertyValue("--line").trim() || "#e5e7eb";
    const axis = { stroke: ink, grid: { stroke: rule, width: 1 }, ticks: { stroke: rule, width: 1 } };
    const xAxis = { ...axis, label: xLabel };
    if (ordinal) {
      // One tick per evaluation, thinned to one per ~90 px.
      xAxis.splits = (u, _i, min, max) => {
        const n = labels.current.length;
        const room = Math.max(1, Math.floor(u.bbox.width / (window.devicePixelRatio || 1) / 90));
        const step = Math.max(1, Math.ceil(n / room));
        const out = [];
        for (let i = 0; i < n; i += step) if (i >= min && i <= max) out.push(i);
        return out;
      };
      xAxis.values = (_u, splits) => splits.map((v) => labels.current[v] ?? "");
    } else if (integerX) {
      xAxis.incrs = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000];
      xAxis.incrs.push(1e5, 2e5, 5e5, 1e6, 2e6, 5e6, 1e7, 1e8, 1e9);
      xAxis.values = (_u, splits) => splits.map((v) => String(v));
    }
    const xValue = (_u, v) => {
      if (v === null || v === undefined) return "—";
      return ordinal ? (labels.current[Math.round(v)] ?? "") : fmtValue(v);
    };
    const opts = {
      width: Math.max(300, el.clientWidth || 600),
      height,
      scales: { x: { time: false, range: (u) => xRange(u.data[0], ordinal) } },
      axes: [xAxis, { ...axis, label: yLabel, size: 64, values: (_u, splits) => splits.map(fmtValue) }],
      series: [
        { label: xLabel, value: xValue },
        ...series.map((s, i) => {
          const color = colors[i];
          if (s.role) {
            return {
              label: s.label,
              class: "band-edge",
              stroke: faded(color, 0.35),
              width: 1,
              spanGaps: true,
              points: { show: false },
              value: (_u, v) => fmtValue(v),
            };
          }
          return {
            label: s.label,
            stroke: color,
            dash: s.dash,
            width: 2,
            spanGaps: true,
            // A lone point (one epoch, one evaluation) has no line: a bigger, filled dot.
            points: few ? { show: true, size: 10, fill: color } : { show: true, size: 6 },
            value: (_u, v) => fmtValue(v),
          };
        }),
      ],
      // uPlot's series 0 is x: a band between a "high" edge (i) and its "low" (i + 1) is [i + 1, i + 2].
      bands: series.flatMap((s, i) =>
        s.role === "high" && series[i + 1]?.role === "low" ? [{ series: [i + 1, i + 2], fill: faded(colors[i], 0.15) }] : [],
      ),
      legend: { show: true },
      hooks: { ready: [showLatest], setLegend: [showLatest] },
    };
    plot.current = new uPlot(opts, [x, ...series.map((s) => s.values)], el);
    const resize = new ResizeObserver(() => {
      if (plot.current && el.clientWidth) plot.current.setSize({ width: el.clientWidth, height });
    });
    resize.observe(el);
    return () => {
      resize.disconnect();
      plot.current?.destroy();
      plot.current = null;
    };
  }, [shape, xLabel, yLabel, integerX, ordinal, few, height]);

  useEffect(() => {
    plot.current?.setData([x, ...series.map((s) => s.values)]);
  }, [x, series]);

  const curves = series.filter((s) => !s.role);
  const points = curves.reduce((n, s) => n + s.values.filter((v) => v !== null && Number.isFinite(v)).length, 0);
  const banded = series.some((s) => s.role);
  return <div class="chart" ref={box} data-testid={testId} data-points={points} data-banded={String(banded)} />;
}
