// Time-series charts on uPlot (vendored, MIT): fast with thousands of points, no build.
import { clear, h } from "./dom.js";

const PALETTE = ["#2f6fed", "#d64545", "#1f9d55", "#d98c00", "#8e44ad", "#16a2b8", "#6c757d", "#e67e22"];
const live = new Set();

function dispose(chart) {
  chart.observer.disconnect();
  chart.plot.destroy();
  live.delete(chart);
}

// Charts of the page being left: their resize observers go with them.
export function disposeCharts() {
  for (const chart of [...live]) dispose(chart);
}

// After a redraw is swapped in, the charts of the content it replaced go.
export function pruneCharts() {
  for (const chart of [...live]) if (!chart.box.isConnected) dispose(chart);
}

/**
 * Draws series over time into `box`, or says there is nothing to draw.
 * xs: Unix seconds; series: [{label, values, color?}]; thresholds: [{label, value, color}].
 * `box.dataset.points` tells how many points it holds (what the browser test reads).
 */
export function timeChart(box, { title, xs, series, yFmt = String, height = 220, thresholds = [], fromZero = false, spanGaps = true }) {
  for (const chart of [...live]) if (chart.box === box) dispose(chart);
  box.classList.add("chart");
  box.dataset.points = String(xs.length);
  if (!xs.length || !series.some((s) => s.values.some((v) => v !== null && v !== undefined))) {
    box.dataset.points = "0";
    clear(box, h("h3", {}, title), h("div", { class: "empty" }, "No data in this window yet."));
    return null;
  }
  // uPlot sizes itself in pixels: it goes in a child whose width is the card's content.
  const target = h("div");
  clear(box, target);
  const format = (v) => (v === null || v === undefined ? "–" : yFmt(v));
  const opts = {
    title,
    width: Math.max(280, target.clientWidth),
    height,
    scales: {
      x: { time: true },
      // Rates and counts start at zero, so a flat zero line is not drawn as noise.
      ...(fromZero ? { y: { range: (u, min, max) => [0, max > 0 ? max * 1.1 : 1] } } : {}),
    },
    series: [
      {},
      ...series.map((s, i) => ({
        label: s.label,
        stroke: s.color ?? PALETTE[i % PALETTE.length],
        width: 2,
        spanGaps,
        value: (u, v) => format(v),
      })),
      ...thresholds.map((t) => ({
        label: t.label,
        stroke: t.color,
        width: 1,
        dash: [6, 4],
        points: { show: false },
        value: (u, v) => format(v),
      })),
    ],
    axes: [{}, { size: 64, values: (u, vals) => vals.map(format) }],
  };
  const data = [xs, ...series.map((s) => s.values), ...thresholds.map((t) => xs.map(() => t.value))];
  const plot = new uPlot(opts, data, target);
  // One point alone gets an axis of years around it: an hour either side instead.
  if (xs.length === 1) plot.setScale("x", { min: xs[0] - 3600, max: xs[0] + 3600 });
  const observer = new ResizeObserver(() => {
    if (target.clientWidth > 0) plot.setSize({ width: target.clientWidth, height });
  });
  observer.observe(target);
  live.add({ box, plot, observer });
  return plot;
}

export const seconds = (iso) => Math.floor(new Date(iso).getTime() / 1000);
