// The virtuous cycle: its status, runs (findings, actions, outcomes), experiments, and a
// button that queues a run and follows it until it shows in the runs.
import { api } from "./api.js";
import { badge, clear, errorBanner, fmt, h, kv, statCard, table } from "./dom.js";

const POLL_MS = 2000;
const FOLLOW_MS = 180_000;

export async function cycle(view, context) {
  const [status, runs, experiments] = await Promise.all([
    api.get("/v1/virtuous-cycle/status"),
    api.get("/v1/virtuous-cycle/runs", { limit: 30 }),
    api.get("/v1/virtuous-cycle/experiments", { limit: 50 }),
  ]);
  const note = h("span", { id: "trigger-note", class: "muted" });
  const button = h("button", { id: "trigger-run", class: "primary", type: "button" }, "Run the cycle now");
  const runsBox = h("div", { id: "runs" });
  button.addEventListener("click", () => trigger(button, note, runsBox, context));
  clear(
    view,
    h("div", { class: "toolbar" }, h("h1", {}, "Virtuous cycle"), h("span", { class: "spacer" }), note, button),
    h(
      "div",
      { class: "cards" },
      statCard("Policy", status.policy),
      statCard("Last completed run", fmt.ago(status.last_run?.finished_at)),
      statCard("Latest run", status.latest_run ? status.latest_run.status : "none yet"),
      statCard("Running job", status.running_job ?? "none"),
      statCard("Next scheduled run", status.next_run_at ? fmt.time(status.next_run_at) : "–"),
    ),
    h("h2", {}, "Runs"),
    runsBox,
    h("h2", {}, "Experiments"),
    experimentTable(experiments.data, status.routes),
  );
  showRuns(runsBox, runs.data);
}

async function trigger(button, note, runsBox, context) {
  button.disabled = true;
  note.textContent = "Queueing a run…";
  let job;
  try {
    job = await api.post("/v1/virtuous-cycle/trigger", {});
  } catch (error) {
    note.textContent = error.message;
    button.disabled = false;
    return;
  }
  note.textContent = job.already_running ? `A run is already under way (job ${job.id}); following it…` : `Queued job ${job.id}; waiting for the run…`;
  const until = Date.now() + FOLLOW_MS;
  while (Date.now() < until && context.current()) {
    await new Promise((r) => setTimeout(r, POLL_MS));
    if (!context.current()) return;
    let runs;
    try {
      runs = (await api.get("/v1/virtuous-cycle/runs", { limit: 30 })).data;
    } catch {
      continue; // a database hiccup: the next poll tries again
    }
    const run = runs.find((r) => r.job_id === job.id);
    showRuns(runsBox, runs, run?.id);
    if (run && run.status !== "running") {
      note.textContent = `Run ${run.id} ${run.status}: ${run.findings} findings, ${run.actions} actions.`;
      button.disabled = false;
      return;
    }
    if (run) note.textContent = `Run ${run.id} is running…`;
  }
  note.textContent = `Job ${job.id} has not finished yet; see /admin/jobs/${job.id}.`;
  button.disabled = false;
}

function showRuns(box, runs, fresh = null) {
  const rows = [];
  for (const run of runs) {
    const detail = h("tr", { hidden: true }, h("td", { colspan: 8, class: "wrap" }));
    const row = h(
      "tr",
      { class: `clickable ${run.id === fresh ? "fresh" : ""}`, dataset: { run: run.id, job: run.job_id ?? "" }, onclick: () => toggle(run.id, detail) },
      h("td", {}, fmt.time(run.started_at)),
      h("td", { class: "mono" }, run.id),
      h("td", {}, run.trigger),
      h("td", {}, badge(run.status)),
      h("td", { class: "num" }, fmt.int(run.findings)),
      h("td", { class: "num" }, fmt.int(run.actions)),
      h("td", { class: "num" }, duration(run)),
      h("td", { class: "mono muted" }, run.job_id ?? ""),
    );
    rows.push(row, detail);
  }
  clear(box, table(["Started", "Run", "Trigger", "Status", "Findings#", "Actions#", "Took#", "Job"], rows, { empty: "No runs yet." }));
}

function duration(run) {
  if (!run.finished_at) return "–";
  return `${((new Date(run.finished_at) - new Date(run.started_at)) / 1000).toFixed(1)} s`;
}

async function toggle(id, detail) {
  if (!detail.hidden) {
    detail.hidden = true;
    return;
  }
  detail.hidden = false;
  const cell = detail.firstChild;
  clear(cell, h("span", { class: "muted" }, "Loading…"));
  try {
    const run = await api.get(`/v1/virtuous-cycle/runs/${encodeURIComponent(id)}`);
    clear(
      cell,
      run.error ? errorBanner(run.error) : null,
      h("h3", {}, `Findings (${run.findings.length})`),
      list(run.findings, (f) => `[${f.severity ?? f.kind ?? ""}] ${f.route ?? ""} ${f.message ?? JSON.stringify(f)}`),
      h("h3", {}, `Actions (${run.actions.length})`),
      list(run.actions, ({ kind, route, subject, ...rest }) => `${kind} ${route} ${subject ?? ""} ${JSON.stringify(rest)}`),
      h("h3", {}, `Outcomes of earlier actions (${run.outcomes.length})`),
      list(run.outcomes, ({ kind, route, outcome, ...rest }) => `${kind ?? ""} ${route ?? ""}: ${outcome ?? ""} ${JSON.stringify(rest)}`),
    );
  } catch (error) {
    clear(cell, errorBanner(error));
  }
}

function list(items, line) {
  if (!items.length) return h("p", { class: "muted" }, "None.");
  return h("ul", {}, items.map((item) => h("li", { class: "mono" }, line(item))));
}

function experimentTable(experiments, routes) {
  const rows = experiments.map((e) => {
    const figures = routes?.[e.route]?.deployments ? routes[e.route] : null;
    return h(
      "tr",
      {},
      h("td", {}, fmt.time(e.started_at)),
      h("td", {}, e.route),
      h("td", {}, badge(e.status)),
      h("td", { class: "wrap mono" }, Object.entries(e.arms ?? {}).map(([v, share]) => `${v}${v === e.control ? " (control)" : ""}: ${fmt.pct(share)}`).join(", ")),
      h("td", { class: "mono" }, e.winner ?? "–"),
      h("td", { class: "wrap" }, e.decision ? decisionView(e.decision) : h("span", { class: "muted" }, figures ? "collecting evidence" : "–")),
    );
  });
  return table(["Started", "Route", "Status", "Arms", "Winner", "Statistics and decision"], rows, { empty: "No experiments yet." });
}

// An experiment's statistics: each candidate against the control, with the test's verdict.
function decisionView(d) {
  const arm = (a) => (a ? `n=${fmt.int(a.n)}, mean ${fmt.q(a.mean)}` : "–");
  const pairs = [["control", arm(d.control_arm)]];
  for (const c of d.comparisons ?? []) {
    const diff = c.difference;
    const bounds = diff ? ` (${diff.estimate >= 0 ? "+" : ""}${fmt.q(diff.estimate)}, bounds ${fmt.q(diff.low)} to ${fmt.q(diff.high)})` : "";
    pairs.push([c.variant, `${arm(c.variant_arm)}: ${c.verdict}${c.rule ? ` by ${c.rule}` : ""}${bounds}`]);
  }
  if (d.alpha !== undefined) pairs.push(["alpha", fmt.q(d.alpha)]);
  if (d.policy) pairs.push(["policy", Object.entries(d.policy).map(([k, v]) => `${k}=${v}`).join(", ")]);
  for (const [k, v] of Object.entries(d)) {
    if (!["control_arm", "comparisons", "alpha", "policy"].includes(k)) pairs.push([k, typeof v === "object" ? JSON.stringify(v) : String(v)]);
  }
  return kv(pairs);
}
