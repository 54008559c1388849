// Devices, their measurements (latency against level per Linear shape), uploads and fits.
"use strict";

// Measurements fetched for the plot; the API's maximum page.
const MEASUREMENT_LIMIT = 100000;

const messages = document.getElementById("messages");
let devices = [];
let selected = null;

async function loadDevices() {
  try {
    devices = await api("/v1/devices");
  } catch (error) {
    showError(messages, error);
    return;
  }
  const table = document.getElementById("devices");
  if (!devices.length) {
    clear(table);
    showNotice(messages, "No devices yet: add one below and upload its measurements, or submit jobs on device local.");
  } else {
    clear(messages);
    const header = el("tr", {}, el("th", {}, "Device"), el("th", {}, "Description"), el("th", { class: "number" }, "Measurements"), el("th", {}, "Latest latency model"));
    const rows = devices.map((device) =>
      el(
        "tr",
        { "data-device-id": device.id },
        el("td", {}, el("a", { href: `/devices?device=${device.id}` }, device.name)),
        el("td", {}, device.description),
        el("td", { class: "number" }, device.measurement_count),
        el("td", {}, device.latest_latency_model_id === null ? "none" : el("a", { href: `/latency-models?device=${device.id}` }, `#${device.latest_latency_model_id}`)),
      ),
    );
    table.replaceChildren(el("thead", {}, header), el("tbody", {}, ...rows));
  }
  document.getElementById("upload-device").replaceChildren(...devices.map((device) => el("option", { value: device.id }, device.name)));
  const wanted = Number(queryParameter("device"));
  const device = devices.find((item) => item.id === wanted) || (devices.length === 1 ? devices[0] : null);
  if (device) showDevice(device);
}

// The spread of one record below and above its median: the 10th to 90th percentile when the
// file gives both, else one standard deviation each way, else none.
function spread(record) {
  if (record.p10_ms != null && record.p90_ms != null) return [record.median_ms - record.p10_ms, record.p90_ms - record.median_ms];
  if (record.std_ms != null) return [record.std_ms, record.std_ms];
  return [0, 0];
}

// Group linear records by shape and tokens, each group one trace of latency against level.
function measurementTraces(records) {
  const groups = new Map();
  for (const record of records) {
    if (record.op !== "linear") continue;
    const tokens = record.tokens || 1;
    const key = `${record.out_features}×${record.in_features}` + (tokens === 1 ? "" : `, ${tokens} tokens`);
    if (!groups.has(key)) groups.set(key, []);
    groups.get(key).push(record);
  }
  return [...groups.entries()].map(([name, group]) => {
    group.sort((a, b) => a.level - b.level);
    const spreads = group.map(spread);
    return {
      name,
      type: "scatter",
      mode: "lines+markers",
      x: group.map((r) => r.level),
      y: group.map((r) => r.median_ms),
      error_y: { type: "data", symmetric: false, array: spreads.map((pair) => pair[1]), arrayminus: spreads.map((pair) => pair[0]), visible: true },
      hovertemplate: `${name}, level %{x}: %{y:.4g} ms<extra></extra>`,
    };
  });
}

async function showDevice(device) {
  selected = device;
  document.getElementById("device-view").classList.remove("hidden");
  document.getElementById("device-title").textContent = `Device ${device.name}`;
  document.getElementById("upload-device").value = device.id;
  const box = document.getElementById("measurement-messages");
  let records;
  try {
    records = await api(`/v1/devices/${device.id}/measurements?limit=${MEASUREMENT_LIMIT}`);
  } catch (error) {
    showError(box, error);
    return;
  }
  const counts = {};
  for (const record of records) counts[record.op] = (counts[record.op] || 0) + 1;
  document.getElementById("record-counts").replaceChildren(
    el("tr", {}, ...["linear", "model", "remainder"].map((op) => el("th", { class: "number" }, `${op} records`))),
    el("tr", {}, ...["linear", "model", "remainder"].map((op) => el("td", { class: "number", "data-op": op }, counts[op] || 0))),
  );
  const traces = measurementTraces(records);
  if (!traces.length) {
    showNotice(box, "This device has no Linear measurements yet: upload a file below.");
    Plotly.purge("measurements");
    return;
  }
  clear(box);
  const layout = basePlotLayout({
    xaxis: { title: { text: "level (n zeros / 4-n kept)" }, zeroline: false, tickvals: [0, 1, 2, 3], ticktext: [0, 1, 2, 3].map(describeLevel) },
    yaxis: { title: { text: "median latency (ms per call)" }, rangemode: "tozero" },
  });
  Plotly.react("measurements", traces, layout, PLOT_CONFIG);
  document.getElementById("measurements").dataset.points = traces.reduce((sum, trace) => sum + trace.x.length, 0);
}

document.getElementById("fit").addEventListener("click", async () => {
  const box = document.getElementById("fit-messages");
  showNotice(box, "Fitting…");
  try {
    const fitted = await api(`/v1/devices/${selected.id}/latency-models`, { method: "POST", json: {} });
    showNotice(box, `Latency model #${fitted.id} fitted on ${fitted.measurement_count} measurements: `, el("a", { href: `/latency-models?device=${selected.id}&model=${fitted.id}` }, "see its accuracy"));
  } catch (error) {
    showError(box, error);
  }
});

document.getElementById("device-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const box = document.getElementById("device-form-messages");
  const form = event.target;
  try {
    const device = await api("/v1/devices", { method: "POST", json: { name: form.elements.name.value.trim(), description: form.elements.description.value } });
    showNotice(box, `Device ${device.name} created: upload its measurements below.`);
    setQueryParameter("device", device.id);
    await loadDevices();
  } catch (error) {
    showError(box, error);
  }
});

document.getElementById("upload-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const box = document.getElementById("upload-messages");
  const file = document.getElementById("measurement-file").files[0];
  const deviceId = document.getElementById("upload-device").value;
  if (!deviceId) {
    showError(box, new PageError("no device: create a device first"));
    return;
  }
  if (!file) {
    showError(box, new PageError("no file chosen: choose a CSV or JSON Lines measurement file"));
    return;
  }
  try {
    const upload = new FormData();
    upload.append("file", file, file.name);
    const stored = await api(`/v1/devices/${deviceId}/measurements`, { method: "POST", body: upload });
    const warnings = stored.warnings.length ? ` Warnings: ${stored.warnings.join("; ")}` : "";
    showNotice(box, `${stored.records} measurements stored.${warnings}`);
    setQueryParameter("device", deviceId);
    await loadDevices();
  } catch (error) {
    showError(box, error);
  }
});

loadDevices();
