// The dashboard's shell: hash routes to pages, refresh timers, logout.
import { disposeCharts } from "./charts.js";
import { cycle } from "./cycle.js";
import { clear, errorBanner, h } from "./dom.js";
import { keys } from "./keys.js";
import { overview } from "./overview.js";
import { requestDetail, requests } from "./requests.js";
import { routeDetail, routes } from "./routes.js";

const view = document.getElementById("view");
const PAGES = {
  overview: [overview, null],
  routes: [routes, routeDetail],
  cycle: [cycle, null],
  requests: [requests, requestDetail],
  keys: [keys, null],
};
let generation = 0;
let timer = null;

function parse() {
  const [path, search = ""] = location.hash.replace(/^#\/?/, "").split("?");
  const [page, ...rest] = path.split("/");
  return { page: PAGES[page] ? page : "overview", arg: rest.length ? decodeURIComponent(rest.join("/")) : null, query: new URLSearchParams(search) };
}

async function render(refresh = false) {
  const mine = ++generation;
  clearTimeout(timer);
  const { page, arg, query } = parse();
  // A new page never shows the last one's rows while it loads; a refresh keeps them.
  if (!refresh) {
    disposeCharts();
    clear(view, h("p", { class: "muted" }, "Loading…"));
  }
  for (const a of document.querySelectorAll("#nav a")) a.classList.toggle("active", a.dataset.page === page);
  const [list, detail] = PAGES[page];
  const show = arg !== null && detail ? detail : list;
  const context = { arg, query, current: () => mine === generation };
  let outcome;
  try {
    outcome = await show(view, context);
  } catch (error) {
    if (mine === generation) clear(view, errorBanner(error));
    return;
  }
  // Pages that ask for it are redrawn while shown; a hidden tab asks for nothing.
  if (outcome?.refreshS && mine === generation) {
    timer = setTimeout(function again() {
      if (mine !== generation) return;
      if (document.visibilityState === "visible") render(true);
      else timer = setTimeout(again, outcome.refreshS * 1000);
    }, outcome.refreshS * 1000);
  }
}

document.getElementById("logout").addEventListener("click", async () => {
  await fetch("/dashboard/logout", { method: "POST", credentials: "same-origin" });
  location.assign("/dashboard/login");
});
window.addEventListener("hashchange", () => render());
if (!location.hash) history.replaceState(null, "", "#/overview");
render();
