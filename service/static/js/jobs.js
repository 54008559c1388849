// The jobs list: state, progress, budget and best result of each job, refreshed while jobs run.
"use strict";

// Seconds between refreshes while a job is queued or running, and otherwise.
const ACTIVE_REFRESH_S = 2;
const IDLE_REFRESH_S = 10;
const PAGE_SIZE = 200;

const filter = document.getElementById("state-filter");
const tbody = document.querySelector("#jobs tbody");
const messages = document.getElementById("messages");
const count = document.getElementById("job-count");
let timer = null;

function jobRow(job) {
  const progress = job.progress;
  const best = job.best || {};
  return el(
    "tr",
    { "data-job-id": job.id },
    el("td", {}, el("a", { href: `/jobs/${job.id}` }, `#${job.id}`)),
    el("td", { class: "state-cell" }, stateBadge(job.state), job.cancel_requested && job.state === "running" ? " (cancelling)" : null),
    el(
      "td",
      { class: "progress" },
      el("progress", { max: progress.trials_total || 1, value: progress.trials_done }),
      ` ${progress.trials_done}/${progress.trials_total}`,
    ),
    el("td", {}, describeBudget(job.spec)),
    el("td", { class: "number best-quality" }, formatNumber(best.quality)),
    el("td", { class: "number best-latency" }, formatMs(best.predicted_latency_ms)),
    el("td", {}, job.spec.model),
    el("td", {}, job.spec.device),
    el("td", { class: "muted" }, job.created_at ? job.created_at.replace("T", " ").slice(0, 19) : "–"),
  );
}

async function refresh() {
  clearTimeout(timer);
  const state = filter.value;
  const query = new URLSearchParams({ limit: PAGE_SIZE });
  if (state) query.set("state", state);
  let active = false;
  try {
    const page = await api(`/v1/jobs?${query}`);
    clear(messages);
    tbody.replaceChildren(...page.items.map(jobRow));
    if (page.items.length === 0) {
      showNotice(messages, state ? `No ${state} jobs.` : "No jobs yet: ", state ? null : el("a", { href: "/submit" }, "submit one"));
    }
    const shown = page.items.length < page.total ? `newest ${page.items.length} of ${page.total}` : `${page.total}`;
    count.textContent = `${shown} job${page.total === 1 ? "" : "s"}`;
    active = page.items.some((job) => !FINAL_STATES.includes(job.state));
  } catch (error) {
    showError(messages, error);
  }
  timer = setTimeout(refresh, 1000 * (active ? ACTIVE_REFRESH_S : IDLE_REFRESH_S));
}

filter.value = queryParameter("state") || "";
filter.addEventListener("change", () => {
  setQueryParameter("state", filter.value);
  refresh();
});
refresh();
