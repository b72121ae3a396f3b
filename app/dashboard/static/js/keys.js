// Keys (never a secret: the API has none to give) with usage against their limits and
// budgets, read live from the limiter's counters; open and recent alerts.
import { api } from "./api.js";
import { badge, clear, errorBanner, fmt, h, meter, table } from "./dom.js";

const PAGE = 100;

export async function keys(view) {
  const keysBox = h("div", { id: "keys" });
  const more = h("button", { type: "button", hidden: true }, "More keys");
  const openBox = h("div", { id: "open-alerts" });
  const recentBox = h("div", { id: "recent-alerts" });
  clear(
    view,
    h("div", { class: "toolbar" }, h("h1", {}, "Keys & alerts")),
    h("h2", {}, "Open alerts"),
    openBox,
    h("h2", {}, "API keys"),
    keysBox,
    more,
    h("h2", {}, "Recent alerts"),
    recentBox,
  );
  const rows = [];
  let after = null;
  async function page() {
    more.disabled = true;
    try {
      const found = await api.get("/admin/keys", { usage: true, limit: PAGE, after });
      rows.push(...found.data.map(keyRow));
      after = found.last_id;
      more.hidden = !found.has_more;
      const warning = found.usage_error ? h("div", { class: "banner" }, `Usage unavailable: ${found.usage_error}`) : null;
      clear(keysBox, warning, table(["Name", "Key", "Status", "Routes", "Requests/min", "Tokens/min", "Budget", "Expires"], rows, { empty: "No keys yet." }));
    } catch (error) {
      clear(keysBox, errorBanner(error));
    } finally {
      more.disabled = false;
    }
  }
  more.addEventListener("click", page);
  const [open, recent] = await Promise.allSettled([api.get("/admin/alerts", { open: true, limit: 100 }), api.get("/admin/alerts", { limit: 50 }), page()]);
  clear(openBox, open.status === "fulfilled" ? alertTable(open.value.data, "No open alerts.") : errorBanner(open.reason));
  clear(recentBox, recent.status === "fulfilled" ? alertTable(recent.value.data, "No alerts.") : errorBanner(recent.reason));
}

function keyRow(k) {
  const u = k.usage;
  const budget = u?.budget;
  return h(
    "tr",
    { dataset: { key: k.id } },
    h("td", {}, k.name),
    h("td", { class: "mono" }, `${k.display_prefix ?? ""}… (${k.id})`),
    h("td", {}, badge(...keyState(k))),
    h("td", { class: "wrap" }, k.allowed_routes?.length ? k.allowed_routes.join(", ") : "all"),
    h("td", {}, u ? meter(u.requests_per_min?.used, u.requests_per_min?.limit ?? k.rpm, "used") : fmt.int(k.rpm)),
    h("td", {}, u ? meter(u.tokens_per_min?.used, u.tokens_per_min?.limit ?? k.tpm, "used") : fmt.int(k.tpm)),
    h("td", {}, budget ? budgetMeter(budget, k) : k.budget_usd === null ? "none" : fmt.usd(k.budget_usd)),
    h("td", {}, k.expires_at ? fmt.time(k.expires_at) : "never"),
  );
}

function keyState(k) {
  if (!k.active) return ["revoked", "critical"];
  if (k.expires_at && k.expires_at * 1000 <= Date.now()) return ["expired", "warning"];
  return ["active", "ok"];
}

function budgetMeter(b, k) {
  const limit = b.limit_usd ?? k.budget_usd;
  const spent = b.spent_usd ?? 0;
  const label = `${b.period ?? k.budget_period ?? "total"}${b.resets_at ? `, resets ${fmt.time(b.resets_at)}` : ""}`;
  if (limit === null || limit === undefined) return h("small", { class: "muted" }, `${fmt.usd(spent)} spent (no budget)`);
  const m = meter(Number(spent.toFixed(4)), limit, "USD");
  m.append(h("small", {}, label));
  return m;
}

function alertTable(alerts, empty) {
  const rows = alerts.map((a) =>
    h(
      "tr",
      {},
      h("td", {}, fmt.time(a.created_at)),
      h("td", {}, badge(a.severity, a.severity)),
      h("td", {}, a.kind),
      h("td", {}, a.subject),
      h("td", { class: "wrap" }, a.message),
      h("td", { class: "num" }, fmt.num(a.value)),
      h("td", { class: "num" }, fmt.num(a.baseline)),
    ),
  );
  return table(["Raised", "Severity", "Kind", "Subject", "Message", "Value#", "Baseline#"], rows, { empty });
}
