// DOM building without innerHTML: every value from the API lands as text, never markup.

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs ?? {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") {
      el.addEventListener(name.slice(2), value);
    } else if (name === "class") {
      el.className = value;
    } else if (name === "dataset") {
      Object.assign(el.dataset, value);
    } else {
      el.setAttribute(name, value === true ? "" : String(value));
    }
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
}

export function clear(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

export function badge(text, kind = text) {
  return h("span", { class: `badge ${kind ?? ""}` }, text ?? "–");
}

export function table(headers, rows, { empty = "Nothing yet." } = {}) {
  const head = h("tr", {}, headers.map((t) => h("th", { class: t.endsWith("#") ? "num" : "" }, t.replace(/#$/, ""))));
  const body = rows.length ? rows : [h("tr", {}, h("td", { colspan: headers.length, class: "muted" }, empty))];
  return h("div", { class: "table-wrap" }, h("table", {}, h("thead", {}, head), h("tbody", {}, body)));
}

export function statCard(label, value, id = null) {
  return h("div", { class: "card stat", id }, h("div", { class: "label" }, label), h("div", { class: "value" }, value ?? "–"));
}

// The windows a page can show (hours, as /metrics/history takes them) and the chosen one.
const RANGES = [1, 6, 24];

export function chosenHours(query, fallback) {
  const asked = Number(query.get("hours"));
  return RANGES.includes(asked) ? asked : fallback;
}

export function rangeButtons(base, hours) {
  return RANGES.map((n) =>
    h("a", { href: `${base}?hours=${n}` }, h("button", { type: "button", class: n === hours ? "selected" : "" }, `${n} h`)),
  );
}

export function kv(pairs) {
  return h("dl", { class: "kv" }, pairs.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v ?? "–")]));
}

export function meter(used, limit, label) {
  if (limit === null || limit === undefined) {
    return h("div", { class: "meter" }, h("small", {}, `${label}: ${used ?? 0} (no limit)`));
  }
  const share = limit > 0 ? Math.min(1, (used ?? 0) / limit) : 1;
  const level = share >= 1 ? "full" : share >= 0.8 ? "high" : "";
  const bar = h("div", { class: `bar ${level}` }, h("span"));
  bar.firstChild.style.width = `${(share * 100).toFixed(1)}%`;
  return h("div", { class: "meter" }, bar, h("small", {}, `${label}: ${used ?? 0} / ${limit}`));
}

const number = new Intl.NumberFormat(undefined, { maximumFractionDigits: 2 });

export const fmt = {
  num: (v) => (v === null || v === undefined ? "–" : number.format(v)),
  int: (v) => (v === null || v === undefined ? "–" : Math.round(v).toLocaleString()),
  pct: (v) => (v === null || v === undefined ? "–" : `${(v * 100).toFixed(1)}%`),
  ms: (v) => (v === null || v === undefined ? "–" : `${Math.round(v)} ms`),
  usd: (v) => (v === null || v === undefined ? "–" : `$${v < 0.01 && v > 0 ? v.toPrecision(2) : v.toFixed(2)}`),
  q: (v) => (v === null || v === undefined ? "–" : v.toFixed(3)),
  time: (v) => {
    if (v === null || v === undefined) return "–";
    const d = typeof v === "number" ? new Date(v * 1000) : new Date(v);
    return d.toLocaleString();
  },
  ago: (v) => {
    if (!v) return "–";
    const s = (Date.now() - new Date(v).getTime()) / 1000;
    if (s < 60) return `${Math.max(0, Math.round(s))} s ago`;
    if (s < 3600) return `${Math.round(s / 60)} min ago`;
    if (s < 86400) return `${(s / 3600).toFixed(1)} h ago`;
    return `${(s / 86400).toFixed(1)} d ago`;
  },
};

export function errorBanner(error) {
  const status = error?.status ? ` (${error.status})` : "";
  return h("div", { class: "banner bad" }, `${error?.message ?? error}${status}`);
}
