// A device's fitted latency models: the fit report's accuracy figures and predicted against
// measured latency of its whole-model measurements, with the ±10% band.
"use strict";

const MEASUREMENT_LIMIT = 100000;
// Predictions within this share of the measurement are inside the band.
const BAND = 0.1;

const deviceSelect = document.getElementById("device");
const modelSelect = document.getElementById("latency-model");
const messages = document.getElementById("messages");

async function loadDevices() {
  let devices;
  try {
    devices = (await api("/v1/devices")).filter((device) => device.latest_latency_model_id !== null);
  } catch (error) {
    showError(messages, error);
    return;
  }
  if (!devices.length) {
    showNotice(messages, "No device has a fitted latency model yet: fit one on the ", el("a", { href: "/devices" }, "Devices"), " page.");
    return;
  }
  deviceSelect.replaceChildren(...devices.map((device) => el("option", { value: device.id }, device.name)));
  const wanted = queryParameter("device");
  if (wanted && devices.some((device) => String(device.id) === wanted)) deviceSelect.value = wanted;
  await loadModels();
}

async function loadModels() {
  setQueryParameter("device", deviceSelect.value);
  let models;
  try {
    models = await api(`/v1/devices/${deviceSelect.value}/latency-models`);
  } catch (error) {
    showError(messages, error);
    return;
  }
  models.reverse();
  modelSelect.replaceChildren(...models.map((model) => el("option", { value: model.id }, `#${model.id} (${model.measurement_count} measurements, ${(model.created_at || "").slice(0, 19).replace("T", " ")})`)));
  const wanted = queryParameter("model");
  if (wanted && models.some((model) => String(model.id) === wanted)) modelSelect.value = wanted;
  await showModel(models.find((model) => String(model.id) === modelSelect.value));
}

function figure(label, value, key) {
  return el("div", { class: "figure", "data-key": key }, el("div", { class: "label" }, label), el("div", { class: "value" }, value));
}

function showFigures(model) {
  const fit = model.fit_report;
  const loo = fit.layer_loo || {};
  const records = fit.records || {};
  document.getElementById("figures").replaceChildren(
    figure("Held-out model measurements", fit.count ?? 0, "count"),
    figure("Within ±5%", formatShare(fit.within_5pct), "within_5pct"),
    figure("Within ±10%", formatShare(fit.within_10pct), "within_10pct"),
    figure("Mean absolute error", fit.mape == null ? "–" : `${fit.mape.toFixed(2)}%`, "mape"),
    figure("Largest absolute error", fit.max_ape == null ? "–" : `${fit.max_ape.toFixed(2)}%`, "max_ape"),
    figure("Median signed error", fit.median_error_pct == null ? "–" : `${fit.median_error_pct.toFixed(2)}%`, "median_error_pct"),
    figure("Spearman rank correlation", formatNumber(fit.spearman, 3), "spearman"),
    figure("Layers, leave-one-out within ±10%", loo.count ? `${formatShare(loo.within_10pct)} of ${loo.count}` : "no layer to leave out", "layer_loo"),
    figure("Records: linear / model / remainder", `${records.linear ?? 0} / ${records.model ?? 0} / ${records.remainder ?? 0}`, "records"),
    figure("Held-out share of mixed maps", fit.holdout ?? "–", "holdout"),
  );
  const warnings = [...(model.warnings || []), ...(fit.unpredicted_reasons || [])];
  const box = document.getElementById("warnings");
  if (warnings.length) box.replaceChildren(el("div", { class: "notice" }, "Warnings: ", el("ul", {}, ...warnings.map((text) => el("li", {}, text)))));
  else clear(box);
}

function isUniform(record) {
  const levels = new Set(Object.values(record.levels).map((entry) => entry[2]));
  return Object.keys(record.levels).length > 1 && levels.size === 1;
}

async function showScatter(model) {
  const box = document.getElementById("scatter-messages");
  const records = (await api(`/v1/devices/${deviceSelect.value}/measurements?limit=${MEASUREMENT_LIMIT}`)).filter((record) => record.op === "model");
  if (!records.length) {
    showNotice(box, "This device has no whole-model measurements (op model): the fit could only be checked layer by layer (leave-one-out above).");
    Plotly.purge("scatter");
    return;
  }
  const groups = { uniform: { x: [], y: [], text: [] }, mixed: { x: [], y: [], text: [] } };
  const failures = [];
  for (const record of records) {
    try {
      const predicted = await api(`/v1/latency-models/${model.id}/predict`, {
        method: "POST",
        json: { layers: Object.values(record.levels), model: record.model, tokens: record.tokens || 1 },
      });
      const group = isUniform(record) ? groups.uniform : groups.mixed;
      group.x.push(record.median_ms);
      group.y.push(predicted.latency_ms);
      group.text.push(`${record.model.slice(0, 16)}, ${Object.keys(record.levels).length} layers`);
    } catch (error) {
      failures.push(error.message);
    }
  }
  const all = [...groups.uniform.x, ...groups.mixed.x, ...groups.uniform.y, ...groups.mixed.y];
  const high = Math.max(...all) * 1.05;
  const low = Math.min(...all) * 0.95;
  const line = [low, high];
  const traces = [
    { name: "+10%", x: line, y: line.map((v) => v * (1 + BAND)), mode: "lines", line: { width: 0 }, hoverinfo: "skip", showlegend: false },
    { name: "±10% band", x: line, y: line.map((v) => v * (1 - BAND)), mode: "lines", line: { width: 0 }, fill: "tonexty", fillcolor: "rgba(36, 88, 166, 0.12)", hoverinfo: "skip" },
    { name: "predicted = measured", x: line, y: line, mode: "lines", line: { color: "#5d6776", dash: "dot", width: 1 }, hoverinfo: "skip" },
    { name: `mixed level maps (${groups.mixed.x.length})`, ...groups.mixed, type: "scatter", mode: "markers", marker: { color: "#2458a6", size: 8 }, hovertemplate: "%{text}<br>measured %{x:.4g} ms, predicted %{y:.4g} ms<extra></extra>" },
    { name: `uniform level maps, calibration (${groups.uniform.x.length})`, ...groups.uniform, type: "scatter", mode: "markers", marker: { color: "#b0b5bd", size: 8, symbol: "square" }, hovertemplate: "%{text}<br>measured %{x:.4g} ms, predicted %{y:.4g} ms<extra></extra>" },
  ];
  const layout = basePlotLayout({
    xaxis: { title: { text: "measured latency (ms per call)" }, range: line },
    yaxis: { title: { text: "predicted latency (ms per call)" }, range: line },
  });
  Plotly.react("scatter", traces, layout, PLOT_CONFIG);
  document.getElementById("scatter").dataset.points = groups.uniform.x.length + groups.mixed.x.length;
  if (failures.length) showError(box, new PageError(`${failures.length} measurements could not be predicted: ${failures.slice(0, 3).join("; ")}`));
  else clear(box);
}

async function showModel(model) {
  if (!model) {
    showNotice(messages, "This device has no fitted latency model.");
    return;
  }
  setQueryParameter("model", model.id);
  clear(messages);
  document.getElementById("view").classList.remove("hidden");
  showFigures(model);
  try {
    await showScatter(model);
  } catch (error) {
    showError(document.getElementById("scatter-messages"), error);
  }
}

deviceSelect.addEventListener("change", () => {
  setQueryParameter("model", null);
  loadModels();
});
modelSelect.addEventListener("change", async () => {
  const model = await api(`/v1/latency-models/${modelSelect.value}`).catch((error) => showError(messages, error));
  if (model) showModel(model);
});
loadDevices();
