// Overview: traffic, errors, latency, cost, tokens, cache and quality from
// /metrics/history (all-traffic points only), and this process's cache from /metrics/cache.
import { api } from "./api.js";
import { timeChart, seconds } from "./charts.js";
import { chosenHours, clear, errorBanner, fmt, h, rangeButtons, statCard } from "./dom.js";

export async function overview(view, { query }) {
  const hours = chosenHours(query, 1);
  const buttons = rangeButtons("#/overview", hours);
  const stamp = h("span", { class: "muted" });
  const body = h("div");
  clear(view, h("div", { class: "toolbar" }, h("h1", {}, "Overview"), h("span", { class: "spacer" }), ...buttons, stamp), body);

  const [history, cache] = await Promise.allSettled([
    api.get("/metrics/history", { hours, series: false }),
    api.get("/metrics/cache"),
  ]);
  if (history.status === "rejected") throw history.reason;
  const points = history.value.totals;
  stamp.textContent = `${points.length} points of ${history.value.interval_s} s · updated ${new Date().toLocaleTimeString()}`;
  clear(body, stats(points), charts(points), cache.status === "fulfilled" ? liveCache(cache.value) : errorBanner(cache.reason));
  drawCharts(body, points);
}

function sum(points, pick) {
  return points.reduce((a, p) => a + (pick(p) ?? 0), 0);
}

// A weighted mean of per-bucket figures (percentiles do not add up; this is a summary).
function weighted(points, pick) {
  const n = sum(points, (p) => (pick(p) === null ? 0 : p.requests));
  return n ? sum(points, (p) => (pick(p) === null ? 0 : pick(p) * p.requests)) / n : null;
}

function stats(points) {
  const span = sum(points, (p) => p.bucket_s) || 1;
  const requests = sum(points, (p) => p.requests);
  const lookups = sum(points, (p) => p.cache.hits_l1 + p.cache.hits_l2 + p.cache.misses);
  const l2Lookups = sum(points, (p) => p.cache.hits_l2 + p.cache.misses);
  const qn = sum(points, (p) => p.quality.count);
  return h(
    "div",
    { class: "cards" },
    statCard("Requests/s", fmt.num(requests / span), "stat-rps"),
    statCard("Requests", fmt.int(requests), "stat-requests"),
    statCard("Error rate", fmt.pct(requests ? sum(points, (p) => p.errors) / requests : null), "stat-errors"),
    statCard("Latency p50", fmt.ms(weighted(points, (p) => p.latency_ms.p50)), "stat-p50"),
    statCard("Latency p95", fmt.ms(weighted(points, (p) => p.latency_ms.p95)), "stat-p95"),
    statCard("Cost", fmt.usd(sum(points, (p) => p.cost)), "stat-cost"),
    statCard("Tokens", fmt.int(sum(points, (p) => p.prompt_tokens + p.completion_tokens)), "stat-tokens"),
    statCard("Cache hit L1", fmt.pct(lookups ? sum(points, (p) => p.cache.hits_l1) / lookups : null), "stat-l1"),
    statCard("Cache hit L2", fmt.pct(l2Lookups ? sum(points, (p) => p.cache.hits_l2) / l2Lookups : null), "stat-l2"),
    statCard("Quality", fmt.q(qn ? sum(points, (p) => (p.quality.mean ?? 0) * p.quality.count) / qn : null), "stat-quality"),
  );
}

const CHARTS = ["requests", "latency", "errors", "cost", "tokens", "cache", "quality"];

function charts() {
  return h("div", { class: "grid" }, CHARTS.map((name) => h("div", { class: "card chart", id: `chart-${name}` })));
}

function drawCharts(root, points) {
  const xs = points.map((p) => seconds(p.bucket_start));
  const col = (pick) => points.map(pick);
  const box = (name) => root.querySelector(`#chart-${name}`);
  timeChart(box("requests"), {
    title: "Requests per second",
    fromZero: true,
    xs,
    series: [
      { label: "requests/s", values: col((p) => p.requests / p.bucket_s) },
      { label: "errors/s", values: col((p) => p.errors / p.bucket_s) },
    ],
    yFmt: fmt.num,
  });
  timeChart(box("latency"), {
    title: "Latency",
    xs,
    series: [
      { label: "p50", values: col((p) => p.latency_ms.p50) },
      { label: "p95", values: col((p) => p.latency_ms.p95) },
      { label: "p99", values: col((p) => p.latency_ms.p99) },
    ],
    yFmt: fmt.ms,
  });
  timeChart(box("errors"), {
    title: "Error rate",
    fromZero: true,
    xs,
    series: [{ label: "errors", values: col((p) => (p.requests ? p.error_rate : null)), color: "#d64545" }],
    yFmt: fmt.pct,
  });
  timeChart(box("cost"), {
    title: "Cost per interval",
    fromZero: true,
    xs,
    series: [{ label: "USD", values: col((p) => p.cost) }],
    yFmt: fmt.usd,
  });
  timeChart(box("tokens"), {
    title: "Tokens per interval",
    fromZero: true,
    xs,
    series: [
      { label: "prompt", values: col((p) => p.prompt_tokens) },
      { label: "completion", values: col((p) => p.completion_tokens) },
    ],
    yFmt: fmt.int,
  });
  timeChart(box("cache"), {
    title: "Cache hit rate",
    fromZero: true,
    xs,
    series: [
      { label: "L1", values: col((p) => p.cache.hit_rate.l1) },
      { label: "L2", values: col((p) => p.cache.hit_rate.l2) },
      { label: "any", values: col((p) => p.cache.hit_rate.any) },
    ],
    yFmt: fmt.pct,
  });
  timeChart(box("quality"), {
    title: "Quality (mean score)",
    xs,
    series: [{ label: "quality", values: col((p) => p.quality.mean), color: "#1f9d55" }],
    yFmt: fmt.q,
  });
}

function liveCache(snapshot) {
  const tier = (name, t) => statCard(`${name} hit rate (this process)`, fmt.pct(t.hit_rate ?? null));
  return h("div", {}, h("h2", {}, "Cache now"), h("div", { class: "cards" }, tier("L1", snapshot.l1), tier("L2", snapshot.l2), statCard("L1 entries", fmt.int(snapshot.l1.entries))));
}
