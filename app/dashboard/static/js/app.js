// The dashboard's shell: hash routes to pages, refresh timers, logout.
import { disposeCharts, pruneCharts } from "./charts.js";
import { cycle } from "./cycle.js";
import { clear, errorBanner, h } from "./dom.js";
import { keys } from "./keys.js";
import { overview } from "./overview.js";
import { requestDetail, requests } from "./requests.js";
import { routeDetail, routes } from "./routes.js";

const view = document.getElementById("view");
// page: [list, detail, seconds between redraws (null: drawn once, e.g. paged lists)]
const PAGES = {
  overview: [overview, null, 30],
  routes: [routes, routeDetail, 30],
  cycle: [cycle, null, null],
  requests: [requests, requestDetail, null],
  keys: [keys, null, 30],
};
let generation = 0;
let timer = null;

function parse() {
  const [path, search = ""] = location.hash.replace(/^#\/?/, "").split("?");
  const [page, ...rest] = path.split("/");
  return { page: PAGES[page] ? page : "overview", arg: rest.length ? decodeURIComponent(rest.join("/")) : null, query: new URLSearchParams(search) };
}

// A page is built off-screen and shown only if it is still the one asked for, so a
// slow answer for a page left behind never replaces the page now shown.
async function render(refresh = false) {
  const mine = ++generation;
  clearTimeout(timer);
  const { page, arg, query } = parse();
  for (const a of document.querySelectorAll("#nav a")) a.classList.toggle("active", a.dataset.page === page);
  if (!refresh) {
    disposeCharts();
    clear(view, h("p", { class: "muted" }, "Loading…"));
  }
  const [list, detail, everyS] = PAGES[page];
  const show = arg !== null && detail ? detail : list;
  const current = () => mine === generation;
  const next = h("div");
  try {
    await show(next, { arg, query, current });
    if (current()) {
      view.replaceChildren(next);
      pruneCharts();
    }
  } catch (error) {
    if (!current()) return;
    if (refresh) {
      // A failed redraw keeps what is shown, says why, and tries again next time.
      view.querySelector(":scope > .banner.refresh")?.remove();
      const banner = errorBanner(error);
      banner.classList.add("refresh");
      view.prepend(banner);
    } else {
      clear(view, errorBanner(error));
    }
  }
  if (everyS && current()) schedule(mine, everyS);
}

function schedule(mine, everyS) {
  timer = setTimeout(function again() {
    if (mine !== generation) return;
    // A hidden tab asks for nothing; it redraws once shown again.
    if (document.visibilityState === "visible") render(true);
    else timer = setTimeout(again, everyS * 1000);
  }, everyS * 1000);
}

document.getElementById("logout").addEventListener("click", async () => {
  await fetch("/dashboard/logout", { method: "POST", credentials: "same-origin" });
  location.assign("/dashboard/login");
});
window.addEventListener("hashchange", () => render());
if (!location.hash) history.replaceState(null, "", "#/overview");
render();
