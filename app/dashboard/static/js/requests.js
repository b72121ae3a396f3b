// Requests: the newest first, a page at a time (keyset cursors: the server never loads
// the table), filtered by route, status, cache tier and quality; a detail view per
// request, from which feedback goes to POST /v1/feedback like any client's.
import { api } from "./api.js";
import { badge, clear, errorBanner, fmt, h, kv, table } from "./dom.js";

const FILTERS = {
  status: [["", "any status"], ["ok", "ok"], ["error", "errors"], ["4xx", "4xx"], ["5xx", "5xx"]],
  cache: [["", "any cache"], ["hit-l1", "L1 hit"], ["hit-l2", "L2 hit"], ["miss", "miss"], ["bypass", "bypass"]],
  quality: [["", "any quality"], ["scored", "scored"], ["unscored", "unscored"], ["low", "low (< 0.85)"]],
};
const PAGE = 50;

export async function requests(view, { query }) {
  const routes = await api.get("/admin/routes").then((r) => r.data.map((x) => x.name), () => []);
  const chosen = Object.fromEntries(["route", "status", "cache", "quality"].map((k) => [k, query.get(k) ?? ""]));
  const select = (name, options) =>
    h("select", { name, id: `filter-${name}`, onchange: apply }, options.map(([v, label]) => h("option", { value: v, selected: v === chosen[name] }, label)));
  const form = h(
    "div",
    { class: "toolbar" },
    h("h1", {}, "Requests"),
    h("span", { class: "spacer" }),
    select("route", [["", "any route"], ...routes.map((r) => [r, r])]),
    select("status", FILTERS.status),
    select("cache", FILTERS.cache),
    select("quality", FILTERS.quality),
    h("button", { type: "button", onclick: () => window.dispatchEvent(new HashChangeEvent("hashchange")) }, "Refresh"),
  );
  function apply() {
    const params = new URLSearchParams();
    for (const el of form.querySelectorAll("select")) if (el.value) params.set(el.name, el.value);
    location.assign(`#/requests?${params}`);
  }
  const body = h("tbody");
  const more = h("button", { type: "button", id: "load-more", hidden: true }, "Load more");
  const info = h("p", { class: "muted", id: "requests-info" });
  clear(
    view,
    form,
    h("div", { class: "table-wrap" }, h("table", {}, h("thead", {}, header()), body)),
    h("div", { class: "toolbar" }, more, info),
  );
  let cursor = null;
  let shown = 0;
  async function page() {
    more.disabled = true;
    try {
      const found = await api.get("/admin/requests", { ...chosen, limit: PAGE, cursor });
      for (const r of found.data) body.append(row(r));
      shown += found.data.length;
      cursor = found.next_cursor;
      more.hidden = !found.has_more;
      // A rare filter may fill less than a page from the rows one page may search.
      const partial = found.has_more && found.data.length < PAGE && found.scanned_to;
      info.textContent = `${shown} shown${partial ? `; searched back to ${fmt.time(found.scanned_to)}, load more to search further` : ""}`;
      if (!shown && !found.has_more) body.append(h("tr", {}, h("td", { colspan: 11, class: "muted" }, "No requests match.")));
    } catch (error) {
      info.replaceChildren(errorBanner(error));
    } finally {
      more.disabled = false;
    }
  }
  more.addEventListener("click", page);
  await page();
}

function header() {
  return h("tr", {}, ["Time", "Request", "Route", "Deployment", "Status", "Latency", "Tokens", "Cost", "Cache", "Quality", "Model"].map((t) => h("th", {}, t)));
}

function statusBadge(status) {
  return badge(String(status), status >= 500 ? "critical" : status >= 400 ? "warning" : "ok");
}

function row(r) {
  const open = () => location.assign(`#/requests/${encodeURIComponent(r.id)}`);
  return h(
    "tr",
    { class: "clickable", dataset: { request: r.id }, onclick: open },
    h("td", {}, fmt.time(r.created_at)),
    h("td", { class: "mono" }, h("a", { href: `#/requests/${encodeURIComponent(r.id)}` }, r.id)),
    h("td", {}, r.route ?? "–"),
    h("td", {}, r.deployment ?? "–"),
    h("td", {}, statusBadge(r.status)),
    h("td", { class: "num" }, fmt.ms(r.latency_ms)),
    h("td", { class: "num" }, `${fmt.int(r.prompt_tokens)} / ${fmt.int(r.completion_tokens)}`),
    h("td", { class: "num" }, fmt.usd(r.cost)),
    h("td", {}, r.cache_tier),
    h("td", { class: "num" }, r.quality_score === null ? "–" : `${fmt.q(r.quality_score)} (${r.quality_source})`),
    h("td", {}, r.model ?? "–"),
  );
}

export async function requestDetail(view, { arg }) {
  const r = await api.get(`/admin/requests/${encodeURIComponent(arg)}`);
  const skip = new Set(["object", "body", "feedback", "extra", "quality_reasons"]);
  const fields = Object.entries(r)
    .filter(([k]) => !skip.has(k))
    .map(([k, v]) => [k, v === null ? null : typeof v === "object" ? JSON.stringify(v) : String(v)]);
  const feedbackBox = h("div", { id: "feedback-list" });
  clear(
    view,
    h("div", { class: "toolbar" }, h("a", { href: "#/requests" }, "← Requests"), h("h1", { class: "mono" }, r.id), statusBadge(r.status)),
    h(
      "div",
      { class: "grid" },
      h("div", { class: "card" }, h("h3", {}, "Record"), kv(fields)),
      h(
        "div",
        { class: "card" },
        h("h3", {}, "Quality"),
        kv([
          ["score", r.quality_score === null ? null : fmt.q(r.quality_score)],
          ["source", r.quality_source],
          ["reasons", (r.quality_reasons ?? []).join(", ") || null],
        ]),
        h("h3", { class: "detail" }, "Feedback"),
        feedbackBox,
        feedbackForm(r.id, feedbackBox),
        h("h3", { class: "detail" }, "Extra"),
        h("pre", {}, JSON.stringify(r.extra ?? {}, null, 2)),
      ),
    ),
    h("h2", {}, "Bodies"),
    r.body
      ? h("div", { class: "grid" }, h("div", { class: "card" }, h("h3", {}, "Request (redacted)"), h("pre", {}, pretty(r.body.request))), h("div", { class: "card" }, h("h3", {}, "Response (redacted)"), h("pre", {}, pretty(r.body.response))))
      : h("p", { class: "muted" }, "Not stored: bodies are kept only for routes that opt in, until their retention ends."),
  );
  showFeedback(feedbackBox, r.feedback ?? []);
}

function pretty(text) {
  if (text === null || text === undefined) return "–";
  try {
    return JSON.stringify(typeof text === "string" ? JSON.parse(text) : text, null, 2);
  } catch {
    return String(text);
  }
}

function showFeedback(box, items) {
  const rows = items.map((f) =>
    h("tr", {}, h("td", {}, fmt.time(f.created_at ?? f.updated_at)), h("td", { class: "num" }, fmt.q(f.score)), h("td", { class: "wrap" }, f.comment ?? ""), h("td", { class: "mono" }, f.tenant ?? f.source ?? "")),
  );
  clear(box, table(["When", "Score#", "Comment", "From"], rows, { empty: "No feedback yet." }));
}

function feedbackForm(id, box) {
  const score = h("input", { type: "number", min: 0, max: 1, step: 0.05, placeholder: "score 0–1", id: "feedback-score" });
  const comment = h("input", { type: "text", maxlength: 4000, placeholder: "comment (optional)", id: "feedback-comment" });
  const note = h("span", { class: "muted", id: "feedback-note" });
  async function send(payload) {
    note.textContent = "Sending…";
    try {
      const text = comment.value.trim();
      const sent = await api.post("/v1/feedback", { id, ...payload, ...(text ? { comment: text } : {}) });
      note.textContent = `Accepted (score ${fmt.q(sent.score)}); it shows here once the workers have recorded it.`;
      // Feedback reaches the database through the workers, within seconds: look again.
      for (const wait of [3000, 8000]) {
        setTimeout(async () => {
          if (!box.isConnected) return;
          const again = await api.get(`/admin/requests/${encodeURIComponent(id)}`).catch(() => null);
          if (again && box.isConnected) showFeedback(box, again.feedback ?? []);
        }, wait);
      }
    } catch (error) {
      note.textContent = error.message;
    }
  }
  return h(
    "div",
    { class: "feedback-form" },
    h("button", { type: "button", id: "thumbs-up", onclick: () => send({ thumbs: "up" }) }, "Thumbs up"),
    h("button", { type: "button", id: "thumbs-down", onclick: () => send({ thumbs: "down" }) }, "Thumbs down"),
    score,
    comment,
    h("button", { type: "button", id: "feedback-send", onclick: () => (score.value === "" ? (note.textContent = "Give a score or a thumb.") : send({ score: Number(score.value) })) }, "Send score"),
    note,
  );
}
