// One job: progress, the best configuration, its Pareto plot, levels per layer, baselines and
// latency. Polls the API while the job is queued or running.
"use strict";

const REFRESH_S = 2;
// Quality axes spanning more than this ratio are drawn on a log scale.
const LOG_AXIS_RATIO = 50;

const jobId = decodeURIComponent(window.location.pathname.split("/").filter(Boolean).pop() || "");
const page = {
  title: document.getElementById("title"),
  messages: document.getElementById("messages"),
  body: document.getElementById("job"),
  cancel: document.getElementById("cancel"),
};

let job = null;
let trials = [];
let result = null;
let resultError = null;
let modelOrder = null; // Map: layer name -> index in the model
let layerShapes = null; // Map: layer name -> [out_features, in_features]
let layerLatencyShown = false;
let timer = null;

// --- loading ----------------------------------------------------------------------------------

async function loadModelLayers(model) {
  // A model given as a path has no entry under /v1/models: layers are then ordered by name.
  if (model.includes("/")) return;
  try {
    const detail = await api(`/v1/models/${encodeURIComponent(model)}`);
    modelOrder = new Map(detail.layers.map((layer, index) => [layer.name, index]));
    layerShapes = new Map(detail.layers.map((layer) => [layer.name, [layer.out_features, layer.in_features]]));
  } catch (error) {
    showError(document.getElementById("level-messages"), error);
  }
}

async function refresh() {
  clearTimeout(timer);
  try {
    job = await api(`/v1/jobs/${encodeURIComponent(jobId)}`);
  } catch (error) {
    showError(page.messages, error);
    if (error.status === 404 || error.status === 422) {
      page.title.textContent = `Job ${jobId} not found`;
      page.body.classList.add("hidden");
    } else {
      timer = setTimeout(refresh, 1000 * REFRESH_S);
    }
    return;
  }
  clear(page.messages);
  page.body.classList.remove("hidden");
  renderSummary();

  try {
    trials = await api(`/v1/jobs/${job.id}/trials`);
  } catch (error) {
    showError(page.messages, error);
  }
  if (modelOrder === null) await loadModelLayers(job.spec.model);
  if (["succeeded", "cancelled"].includes(job.state) && result === null && resultError === null) {
    try {
      result = await api(`/v1/jobs/${job.id}/result`);
    } catch (error) {
      resultError = error;
    }
  }

  renderDownloads();
  renderBest();
  renderPareto();
  renderLevels();
  renderBaselines();
  renderWinnerLatency();
  if (report() && !layerLatencyShown) {
    layerLatencyShown = true;
    renderLayerLatency();
  }
  if (!FINAL_STATES.includes(job.state)) timer = setTimeout(refresh, 1000 * REFRESH_S);
}

function report() {
  return result ? result.result : null;
}

// --- summary, downloads, cancel ---------------------------------------------------------------

function renderSummary() {
  document.title = `Job ${job.id} · cn4`;
  page.title.textContent = `Job #${job.id}`;
  document.getElementById("state").replaceChildren(stateBadge(job.state));
  const progress = job.progress;
  const bar = document.getElementById("progress");
  bar.max = progress.trials_total || 1;
  bar.value = progress.trials_done;
  document.getElementById("progress-text").textContent =
    `${progress.trials_done} of ${progress.trials_total} trials` + (job.cancel_requested && !FINAL_STATES.includes(job.state) ? ", cancelling" : "");
  page.cancel.disabled = FINAL_STATES.includes(job.state) || job.cancel_requested;

  const error = document.getElementById("job-error");
  if (job.error) error.replaceChildren(el("div", { class: "error", role: "alert" }, `The job failed: ${job.error}`));
  else clear(error);

  const spec = job.spec;
  const rows = [
    ["Model", spec.model],
    ["Device", spec.device],
    ["Budget", describeBudget(spec)],
    ["Allowed levels", spec.levels.map(describeLevel).join(", ")],
    ["Trials", spec.trials],
    ["Pruning, objective", `${spec.method}, ${spec.objective}${spec.multi_objective ? " (multi-objective)" : ""}`],
    ["Attempts", `${job.attempts} of ${job.max_attempts}`],
    ["Created, started, finished", [job.created_at, job.started_at, job.finished_at].map((t) => (t ? t.replace("T", " ").slice(0, 19) : "–")).join(", ")],
  ];
  document.querySelector("#spec tbody").replaceChildren(...rows.map(([name, value]) => el("tr", {}, el("th", {}, name), el("td", {}, value))));
}

function renderDownloads() {
  const box = document.getElementById("downloads");
  if (!result) {
    clear(box);
    return;
  }
  const files = new Set(result.files);
  const links = [];
  if (files.has("report.json")) links.push(el("a", { href: `/v1/jobs/${job.id}/files/report.json`, download: `cn4-job-${job.id}-report.json` }, "report.json"));
  if (files.has("summary.txt")) links.push(el("a", { href: `/v1/jobs/${job.id}/files/summary.txt`, download: `cn4-job-${job.id}-summary.txt` }, "summary.txt"));
  if (result.files.length) links.push(el("a", { href: `/v1/jobs/${job.id}/download`, id: "download-zip" }, "report and pruned model (zip)"));
  box.replaceChildren("Download: ", ...links.flatMap((link, index) => (index ? [" · ", link] : [link])));
}

page.cancel.addEventListener("click", async () => {
  const box = document.getElementById("action-messages");
  page.cancel.disabled = true;
  try {
    const updated = await api(`/v1/jobs/${job.id}/cancel`, { method: "POST" });
    showNotice(box, updated.state === "cancelled" ? "The job is cancelled." : "Cancel requested: the worker stops after the current trial and keeps the finished trials.");
  } catch (error) {
    showError(box, error);
  }
  refresh();
});

// --- best configuration -----------------------------------------------------------------------

function figure(label, value, id) {
  return el("div", { class: "figure", id }, el("div", { class: "label" }, label), el("div", { class: "value" }, value));
}

function renderBest() {
  const box = document.getElementById("best");
  const best = job.best;
  const full = report();
  if (!best && !(full && full.levels)) {
    box.replaceChildren(el("div", { class: "muted" }, FINAL_STATES.includes(job.state) ? "No feasible trial." : "No feasible trial yet."));
    return;
  }
  const figures = [];
  if (full && !full.feasible) figures.push(figure("Feasible", `no: ${full.infeasible_reason}`));
  const number = best ? best.number : full.best_trial;
  figures.push(figure("Trial", `#${number}`, "best-trial"));
  if (best) figures.push(figure(`Objective (${job.spec.objective}, lower is better)`, formatNumber(best.quality), "best-quality"));
  figures.push(figure("Predicted latency", formatMs(best ? best.predicted_latency_ms : full.predicted_latency_ms), "best-latency"));
  if (full) {
    figures.push(figure("Budget", formatMs(full.budget_ms)));
    figures.push(figure("Dense predicted latency", formatMs(full.dense_latency_ms)));
  }
  figures.push(figure("Sparsity (share of zeroed weights)", formatShare(best ? best.sparsity : full.sparsity)));
  if (full && full.quality.best !== null) {
    figures.push(figure("Held-out perplexity: best / dense", `${formatNumber(full.quality.best)} / ${formatNumber(full.quality.dense)}`));
  }
  box.replaceChildren(...figures);
}

// --- Pareto plot ------------------------------------------------------------------------------

// Feasible points no other feasible point beats on both quality and latency, by latency.
function paretoFront(points) {
  const front = points.filter((point) => !points.some((other) => other !== point && other.x <= point.x && other.y <= point.y && (other.x < point.x || other.y < point.y)));
  return front.sort((a, b) => a.x - b.x);
}

function trialLabel(trial) {
  const seed = trial.seed_name ? ` (${trial.seed_name})` : "";
  return `trial ${trial.number}${seed}`;
}

function renderPareto() {
  const plotted = trials.filter((trial) => trial.predicted_latency_ms !== null);
  const feasible = plotted.filter((trial) => trial.feasible && trial.quality !== null);
  const infeasible = plotted.filter((trial) => !(trial.feasible && trial.quality !== null));
  const qualities = plotted.map((trial) => trial.quality).filter((value) => value !== null);
  const lowest = Math.min(...qualities);
  const highest = Math.max(...qualities);
  const logAxis = qualities.length > 1 && lowest > 0 && highest / lowest > LOG_AXIS_RATIO;
  // Trials over the budget were never measured, so they have no quality: draw them on the top edge.
  let topEdge = 1;
  if (qualities.length && logAxis) topEdge = highest * 1.5;
  else if (qualities.length) topEdge = highest + 0.1 * (highest - lowest || Math.abs(highest) || 1);
  const bestNumber = job.best ? job.best.number : null;

  const points = feasible.map((trial) => ({ x: trial.predicted_latency_ms, y: trial.quality }));
  const front = paretoFront(points);
  const objective = job.spec.objective === "kl" ? "KL to dense (nats/token)" : "perplexity";
  const best = feasible.filter((trial) => trial.number === bestNumber);
  const others = feasible.filter((trial) => trial.number !== bestNumber);
  const hover = "%{text}<br>%{x:.4g} ms, quality %{y:.4g}<extra></extra>";
  const traces = [
    {
      name: "feasible",
      type: "scatter",
      mode: "markers",
      x: others.map((trial) => trial.predicted_latency_ms),
      y: others.map((trial) => trial.quality),
      text: others.map(trialLabel),
      hovertemplate: hover,
      marker: { color: "#2458a6", size: 8 },
    },
    {
      name: "best feasible",
      type: "scatter",
      mode: "markers",
      x: best.map((trial) => trial.predicted_latency_ms),
      y: best.map((trial) => trial.quality),
      text: best.map(trialLabel),
      hovertemplate: hover,
      marker: { color: "#d62728", size: 15, symbol: "star" },
    },
    {
      name: "over the budget",
      type: "scatter",
      mode: "markers",
      x: infeasible.map((trial) => trial.predicted_latency_ms),
      y: infeasible.map((trial) => (trial.quality === null ? topEdge : trial.quality)),
      text: infeasible.map((trial) => `${trialLabel(trial)}: ${trial.reason || trial.state}`),
      hovertemplate: "%{text}<br>%{x:.4g} ms<extra></extra>",
      marker: { color: "#b0b5bd", size: 8, symbol: "x" },
    },
    {
      name: "Pareto front",
      type: "scatter",
      mode: "lines",
      x: front.map((point) => point.x),
      y: front.map((point) => point.y),
      line: { color: "#2458a6", shape: "hv", width: 1.5 },
      hoverinfo: "skip",
    },
  ];
  const full = report();
  const budget = full ? full.budget_ms : job.spec.budget_ms;
  const shapes = [];
  const annotations = [];
  if (budget !== null && budget !== undefined) {
    shapes.push({ type: "line", xref: "x", yref: "paper", x0: budget, x1: budget, y0: 0, y1: 1, line: { color: "#d62728", dash: "dash", width: 1.5 } });
    annotations.push({ xref: "x", yref: "paper", x: budget, y: 1, xanchor: "right", yanchor: "top", text: `budget ${formatNumber(budget)} ms`, showarrow: false, font: { color: "#d62728" } });
  }
  const layout = basePlotLayout({
    xaxis: { title: { text: "predicted latency (ms per token)" }, zeroline: false },
    yaxis: logAxis
      ? { title: { text: objective }, type: "log", dtick: 1, exponentformat: "power" }
      : { title: { text: objective } },
    shapes,
    annotations,
  });
  Plotly.react("pareto", traces, layout, PLOT_CONFIG);

  const element = document.getElementById("pareto");
  element.dataset.feasible = feasible.length;
  element.dataset.infeasible = infeasible.length;
  const unplotted = trials.length - plotted.length;
  document.getElementById("pareto-note").textContent =
    `${trials.length} trials: ${feasible.length} feasible, ${infeasible.length} over the budget` +
    (unplotted ? `, ${unplotted} failed before a prediction (not plotted)` : "") + ".";
}

// --- levels per layer -------------------------------------------------------------------------

function chosenLevels() {
  const full = report();
  if (full && full.levels) return full.levels;
  return job.best ? job.best.levels : null;
}

function renderLevels() {
  const legend = document.getElementById("level-legend");
  legend.replaceChildren(
    ...[0, 1, 2, 3].map((level) => el("span", {}, el("span", { class: "swatch", style: `background: var(--level-${level})` }), describeLevel(level))),
  );
  const table = document.getElementById("levels");
  const levels = chosenLevels();
  if (!levels) {
    clear(table);
    return;
  }
  const names = orderLayers(Object.keys(levels), modelOrder);
  const kinds = [];
  const rows = new Map();
  for (const name of names) {
    const { block, kind } = splitLayerName(name);
    const key = block === null ? name : `block ${block}`;
    if (!rows.has(key)) rows.set(key, { label: block === null ? name : String(block), cells: new Map(), outside: block === null });
    rows.get(key).cells.set(block === null ? null : kind, name);
    if (block !== null && !kinds.includes(kind)) kinds.push(kind);
  }
  const columns = kinds.length ? kinds : [null];
  const header = el("tr", {}, el("th", {}, "block"), ...columns.map((kind) => el("th", {}, kind === null ? "layer" : kind)));
  const body = [...rows.values()].map((row) => {
    const cells = columns.map((kind, index) => {
      // A layer outside the blocks fills the first column of its own row.
      let name = row.cells.get(kind);
      if (row.outside) name = index === 0 ? row.cells.get(null) : undefined;
      if (name === undefined) return el("td", { class: "empty" });
      const level = levels[name];
      const shape = layerShapes && layerShapes.get(name);
      const title = `${name}: ${describeLevel(level)}` + (shape ? ` (${shape[0]}×${shape[1]})` : "");
      return el("td", { class: `level level-${level}`, title, "data-layer": name, "data-level": level }, level);
    });
    return el("tr", {}, el("th", {}, row.label), ...cells);
  });
  table.replaceChildren(el("thead", {}, header), el("tbody", {}, ...body));

  const counts = {};
  for (const level of Object.values(levels)) counts[level] = (counts[level] || 0) + 1;
  const full = report();
  const note = full && !full.feasible ? "No trial was feasible; this is the closest configuration. " : "";
  const summary = Object.keys(counts).sort().map((level) => `${counts[level]} at ${describeLevel(Number(level))}`).join(", ");
  showNotice(document.getElementById("level-messages"), `${note}${names.length} layers: ${summary}.`);
}

// --- predicted latency per layer --------------------------------------------------------------

// Predict each layer of the best configuration and of the dense model with the device's newest
// latency model: a layer's latency is the model's prediction with that layer alone minus the
// prediction with no layer (the fixed part).
async function renderLayerLatency() {
  const box = document.getElementById("layer-latency-messages");
  const plot = document.getElementById("layer-latency");
  const full = report();
  if (!full.levels) {
    showNotice(box, "No configuration to show.");
    return;
  }
  if (!layerShapes) {
    showNotice(box, `Layer shapes are unknown: the job's model ${job.spec.model} is not a registered model name, so GET /v1/models cannot describe its layers.`);
    return;
  }
  try {
    const devices = await api("/v1/devices");
    const device = devices.find((item) => item.name === job.spec.device);
    if (!device || device.latest_latency_model_id === null) {
      showNotice(box, `No fitted latency model for device ${job.spec.device}: per-layer predictions need one. Fit it on the `, el("a", { href: "/devices" }, "Devices"), " page.");
      return;
    }
    const latencyModelId = device.latest_latency_model_id;
    const modelKey = full.device && full.device.model_id ? full.device.model_id : null;
    const predict = async (layers) => {
      const body = { layers, model: modelKey, tokens: 1 };
      return (await api(`/v1/latency-models/${latencyModelId}/predict`, { method: "POST", json: body })).latency_ms;
    };
    const fixed = await predict([]);
    const cache = new Map();
    const layerMs = async (name, level) => {
      const [out, inp] = layerShapes.get(name);
      const key = `${out}x${inp}@${level}`;
      if (!cache.has(key)) cache.set(key, (await predict([[out, inp, level]])) - fixed);
      return cache.get(key);
    };
    const names = orderLayers(Object.keys(full.levels), modelOrder);
    const best = [];
    const dense = [];
    for (const name of names) {
      best.push(await layerMs(name, full.levels[name]));
      dense.push(await layerMs(name, 0));
    }
    const total = fixed + best.reduce((sum, value) => sum + value, 0);
    const labels = names.map((name) => name.replace(/^backbone\./, ""));
    const traces = [
      { name: "dense (level 0)", type: "bar", x: labels, y: dense, marker: { color: "#c9d3e0" } },
      {
        name: "best",
        type: "bar",
        x: labels,
        y: best,
        customdata: names.map((name) => describeLevel(full.levels[name])),
        hovertemplate: "%{x}<br>%{y:.4g} ms, %{customdata}<extra></extra>",
        marker: { color: names.map((name) => getComputedStyle(document.body).getPropertyValue(`--level-${full.levels[name]}`).trim()), line: { color: "#1d2430", width: 0.5 } },
      },
    ];
    const layout = basePlotLayout({
      barmode: "group",
      xaxis: { tickangle: -30, automargin: true },
      yaxis: { title: { text: "predicted latency (ms per token)" } },
    });
    plot.classList.remove("hidden");
    Plotly.react(plot, traces, layout, PLOT_CONFIG);
    plot.dataset.layers = names.length;
    plot.dataset.totalMs = total;
    showNotice(
      box,
      `Latency model #${latencyModelId}, the newest fit of device ${device.name}: fixed part ${formatMs(fixed)} plus the layers gives ${formatMs(total)} ` +
        `(the report predicted ${formatMs(full.predicted_latency_ms)}; they differ when the device was refitted after the job).`,
    );
  } catch (error) {
    showError(box, error);
  }
}

// --- baselines --------------------------------------------------------------------------------

// Why a final job has no report, or `pending` while it may still get one.
function missingReportText(pending) {
  if (job.state === "failed") return "No report: the job failed.";
  if (job.state === "cancelled") return "No report: the job was cancelled before its search wrote one.";
  return pending;
}

function withinBudget(latency, budget) {
  if (budget === null || latency === null) return "–";
  return latency <= budget ? "within" : "over";
}

function renderBaselines() {
  const box = document.getElementById("baseline-messages");
  const table = document.getElementById("baselines");
  const full = report();
  if (!full) {
    clear(table);
    if (resultError && resultError.status !== 409) showError(box, resultError);
    else showNotice(box, missingReportText("The baselines are scored when the search ends."));
    return;
  }
  clear(box);
  const quality = full.quality;
  const rows = [
    { name: "dense", latency: full.dense_latency_ms, sparsity: 0, heldOut: quality.dense, objective: quality.objective_values.dense },
  ];
  if (full.levels) {
    rows.push({ name: `search best (trial ${full.best_trial})`, latency: full.predicted_latency_ms, sparsity: full.sparsity, heldOut: quality.best, objective: quality.objective_values.best, best: true });
  }
  for (const [name, baseline] of Object.entries(full.baselines)) {
    rows.push({ name, latency: baseline.predicted_latency_ms, sparsity: baseline.sparsity, heldOut: baseline.held_out_perplexity, objective: baseline.objective, uniformBest: name === quality.best_uniform });
  }
  const budget = full.budget_ms;
  const header = el(
    "tr",
    {},
    el("th", {}, "configuration"),
    el("th", { class: "number" }, "predicted latency"),
    el("th", {}, "budget"),
    el("th", { class: "number" }, "sparsity"),
    el("th", { class: "number" }, `held-out perplexity`),
    el("th", { class: "number" }, `objective (${job.spec.objective})`),
  );
  const body = rows.map((row) =>
    el(
      "tr",
      { "data-configuration": row.name, style: row.best ? "font-weight: 600" : null },
      el("td", {}, row.name, row.uniformBest ? " (best uniform)" : null),
      el("td", { class: "number" }, formatMs(row.latency)),
      el("td", {}, withinBudget(row.latency, budget)),
      el("td", { class: "number" }, formatShare(row.sparsity)),
      el("td", { class: "number" }, formatNumber(row.heldOut)),
      el("td", { class: "number" }, formatNumber(row.objective)),
    ),
  );
  table.replaceChildren(el("thead", {}, header), el("tbody", {}, ...body));
}

// --- predicted against measured latency of the winner -----------------------------------------

function renderWinnerLatency() {
  const box = document.getElementById("winner-latency-messages");
  const figures = document.getElementById("winner-latency");
  const full = report();
  if (!full) {
    clear(figures);
    showNotice(box, missingReportText("Shown when the search ends."));
    return;
  }
  figures.replaceChildren(
    figure("Winner, predicted", formatMs(full.predicted_latency_ms), "winner-predicted"),
    figure("Winner, measured", formatMs(full.measured_latency_ms), "winner-measured"),
    figure("Prediction error", full.prediction_error === null ? "–" : `${(100 * full.prediction_error).toFixed(1)}%`),
    figure("Dense, predicted", formatMs(full.dense_latency_ms)),
    figure("Dense, measured", formatMs(full.dense_measured_latency_ms)),
  );
  if (full.measured_latency_ms === null) {
    const reason = job.spec.measure === false
      ? "the job ran with measure off"
      : `latency is measured only when the device is this machine ('local'), and this job ran on ${job.spec.device}`;
    showNotice(box, `Not measured: ${reason}.`);
  } else if (full.prediction_disagrees) {
    showNotice(box, "The prediction is off by more than 10%: refit the device's latency model with fresh measurements.");
  } else {
    clear(box);
  }
}

if (/^\d+$/.test(jobId)) {
  refresh();
} else {
  page.title.textContent = "Job not found";
  showError(page.messages, new PageError(`job id ${JSON.stringify(jobId)} is invalid: a job id is a whole number; open a job from the jobs list`));
}
