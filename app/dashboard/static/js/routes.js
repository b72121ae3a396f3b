// Routes: each route's deployments, weights, breakers and quality; a route's detail adds
// weights and quality over time (cycle runs) and per-deployment traffic (metrics history).
import { api } from "./api.js";
import { seconds, timeChart } from "./charts.js";
import { badge, chosenHours, clear, errorBanner, fmt, h, rangeButtons, statCard, table } from "./dom.js";

export async function routes(view) {
  const { data } = await api.get("/admin/routes");
  const rows = data.map((r) =>
    h(
      "tr",
      { class: "clickable", dataset: { route: r.name }, onclick: () => location.assign(`#/routes/${encodeURIComponent(r.name)}`) },
      h("td", {}, h("a", { href: `#/routes/${encodeURIComponent(r.name)}` }, r.name)),
      h("td", {}, r.strategy),
      h("td", {}, badge(r.health)),
      h("td", { class: "num" }, fmt.q(r.quality)),
      h("td", { class: "num" }, trend(r.trend_per_h)),
      h("td", { class: "num" }, fmt.int(r.requests)),
      h("td", { class: "wrap" }, r.deployments.map((d) => h("div", {}, `${d.name} `, circuit(d), ` ${weightOf(r, d)}`))),
      h("td", {}, r.weights_source),
    ),
  );
  clear(
    view,
    h("div", { class: "toolbar" }, h("h1", {}, "Routes"), h("span", { class: "spacer" }), h("span", { class: "muted" }, "quality from the last cycle run; breakers as this gateway replica sees them")),
    table(["Route", "Strategy", "Health", "Quality#", "Trend /h#", "Requests#", "Deployments (breaker, weight)", "Weights"], rows, { empty: "No routes configured." }),
  );
}

function trend(v) {
  if (v === null || v === undefined) return "–";
  return `${v > 0 ? "+" : ""}${v.toFixed(4)}`;
}

function circuit(d) {
  const state = typeof d.circuit === "object" && d.circuit ? d.circuit.state : d.circuit;
  return badge(d.enabled === false ? "disabled" : state ?? "closed", d.enabled === false ? "critical" : state);
}

function weightOf(route, d) {
  const w = route.weights?.[d.name];
  return w === undefined || w === null ? "" : `w=${w.toFixed(3)}`;
}

export async function routeDetail(view, { arg, query }) {
  const hours = chosenHours(query, 24);
  const name = arg;
  const [route, metrics] = await Promise.allSettled([
    api.get(`/admin/routes/${encodeURIComponent(name)}`, { hours }),
    api.get("/metrics/history", { hours, route: name }),
  ]);
  if (route.status === "rejected") throw route.reason;
  const r = route.value;
  const buttons = rangeButtons(`#/routes/${encodeURIComponent(name)}`, hours);
  const t = r.thresholds ?? {};
  const deployments = r.deployments.map((d) =>
    h(
      "tr",
      {},
      h("td", {}, d.name),
      h("td", {}, `${d.provider} · ${d.model ?? "–"}`),
      h("td", {}, circuit(d)),
      h("td", { class: "num" }, fmt.num(d.config_weight)),
      h("td", { class: "num" }, d.live_weight === null || d.live_weight === undefined ? "–" : d.live_weight.toFixed(3)),
      h("td", { class: "num" }, fmt.num(d.priority)),
      h("td", { class: "num" }, concurrency(d.concurrency)),
      h("td", { class: "num" }, fmt.ms(d.latency_ewma_ms)),
      h("td", { class: "muted" }, d.disabled_reason ?? ""),
    ),
  );
  clear(
    view,
    h("div", { class: "toolbar" }, h("a", { href: "#/routes" }, "← Routes"), h("h1", { id: "route-name" }, name), badge(r.health), h("span", { class: "spacer" }), ...buttons),
    h(
      "div",
      { class: "cards" },
      statCard("Strategy", r.strategy),
      statCard("Quality", fmt.q(r.quality)),
      statCard("Trend /h", trend(r.trend_per_h)),
      statCard("Thresholds", `${fmt.q(t.critical)} / ${fmt.q(t.warning)} / ${fmt.q(t.target)}`),
      statCard("Requests (last run)", fmt.int(r.requests)),
      statCard("Error rate", fmt.pct(r.error_rate)),
      statCard("p95 latency", fmt.ms(r.p95_latency_ms)),
      statCard("Cost / request", fmt.usd(r.cost_per_request)),
    ),
    h("h2", {}, "Deployments"),
    table(["Deployment", "Provider · model", "Breaker", "Config weight#", "Live weight#", "Priority#", "Concurrency#", "Latency EWMA#", ""], deployments),
    h("h2", {}, "Over time"),
    h("div", { class: "grid" }, ["weights", "quality", "latency", "traffic"].map((c) => h("div", { class: "card chart", id: `chart-route-${c}` }))),
    metrics.status === "rejected" ? errorBanner(metrics.reason) : null,
  );
  drawHistory(view, r, t);
  if (metrics.status === "fulfilled") drawTraffic(view, r, metrics.value);
}

function concurrency(c) {
  if (c === null || c === undefined) return "–";
  if (typeof c !== "object") return String(c);
  return `${c.in_flight ?? 0} / ${c.limit ?? "∞"}`;
}

// One colour per deployment on every chart of the route; the route's own line is ink.
const COLOURS = ["#2f6fed", "#8e44ad", "#16a2b8", "#e67e22", "#6c757d", "#c2185b", "#2e7d32"];
const colour = (r, name) => COLOURS[Math.max(0, r.deployments.findIndex((d) => d.name === name)) % COLOURS.length];

function drawHistory(root, r, t) {
  const points = r.history ?? [];
  const xs = points.map((p) => seconds(p.at));
  const names = r.deployments.map((d) => d.name);
  timeChart(root.querySelector("#chart-route-weights"), {
    title: "Routing weights (cycle)",
    xs,
    series: names.map((n) => ({ label: n, values: points.map((p) => p.weights?.[n] ?? null), color: colour(r, n) })),
    fromZero: true,
    yFmt: (v) => v.toFixed(2),
  });
  timeChart(root.querySelector("#chart-route-quality"), {
    title: "Quality against thresholds",
    xs,
    series: [
      { label: "route", values: points.map((p) => p.quality ?? null), color: "#1c2330" },
      ...names.map((n) => ({ label: n, values: points.map((p) => p.deployments?.[n]?.quality ?? null), color: colour(r, n) })),
    ],
    thresholds: [
      { label: "critical", value: t.critical, color: "#d64545" },
      { label: "warning", value: t.warning, color: "#d98c00" },
      { label: "target", value: t.target, color: "#1f9d55" },
    ].filter((x) => x.value !== undefined && x.value !== null),
    yFmt: fmt.q,
  });
}

function drawTraffic(root, r, history) {
  // The x axis is every bucket of the window (the all-traffic points have no holes):
  // a deployment's series only holds buckets it served, and a bucket it did not serve
  // is 0 requests and no latency, not a line drawn across the gap.
  const stamps = history.totals.map((p) => p.bucket_start);
  const xs = stamps.map(seconds);
  const mine = history.series.filter((s) => s.route === r.name);
  const column = (s, pick, absent) => {
    const at = new Map(s.points.map((p) => [p.bucket_start, p]));
    return stamps.map((b) => (at.has(b) ? pick(at.get(b)) : absent));
  };
  timeChart(root.querySelector("#chart-route-latency"), {
    title: "p95 latency per deployment",
    xs,
    series: mine.map((s) => ({ label: s.deployment, values: column(s, (p) => p.latency_ms.p95, null), color: colour(r, s.deployment) })),
    yFmt: fmt.ms,
    spanGaps: false,
  });
  timeChart(root.querySelector("#chart-route-traffic"), {
    title: "Requests/s per deployment",
    xs,
    series: mine.map((s) => ({ label: s.deployment, values: column(s, (p) => p.requests / p.bucket_s, 0), color: colour(r, s.deployment) })),
    yFmt: fmt.num,
    fromZero: true,
  });
}
