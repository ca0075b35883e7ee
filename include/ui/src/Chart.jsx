import { useEffect, useRef } from "preact/hooks";
import uPlot from "uplot";
import "uplot/dist/uPlot.min.css";

export const PALETTE = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#db2777", "#4b5563"];

/**
 * A uPlot line chart. `x`: the x values; `series`: [{label, values}] aligned with `x` (null: no point).
 * `data-points` on the wrapper counts the finite points drawn (the e2e test reads it).
 */
export function LineChart({ x, series, xLabel, yLabel, time = false, integerX = false, height = 260, testId }) {
  const box = useRef(null);
  const plot = useRef(null);
  const shape = series.map((s) => s.label).join("\u0000");

  useEffect(() => {
    const el = box.current;
    const opts = {
      width: Math.max(300, el.clientWidth || 600),
      height,
      scales: { x: { time } },
      axes: [
        integerX ? { label: xLabel, incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000] } : { label: xLabel },
        { label: yLabel, size: 60 },
      ],
      series: [
        { label: xLabel },
        ...series.map((s, i) => ({
          label: s.label,
          stroke: PALETTE[i % PALETTE.length],
          width: 2,
          spanGaps: true,
          points: { show: true, size: 6 },
        })),
      ],
      legend: { show: true },
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
  }, [shape, xLabel, yLabel, time, integerX, height]);

  useEffect(() => {
    plot.current?.setData([x, ...series.map((s) => s.values)]);
  }, [x, series]);

  const points = series.reduce((n, s) => n + s.values.filter((v) => v !== null && Number.isFinite(v)).length, 0);
  return <div class="chart" ref={box} data-testid={testId} data-points={points} />;
}
