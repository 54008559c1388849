// Helpers shared by the dashboard pages: API calls, error display, DOM building, formatting.
"use strict";

const TOKEN_KEY = "cn4.apiToken";
const FINAL_STATES = ["succeeded", "failed", "cancelled"];
const GROUP_SIZE = 4;

class ApiError extends Error {
  constructor(status, detail, where) {
    super(detail);
    this.status = status;
    this.where = where;
  }
}

// A message the page itself shows about bad input, e.g. a form sent without a file.
class PageError extends Error {}

// Call the JSON API and return the parsed body; throw ApiError with the server's `detail`.
// Write requests carry the bearer token saved on the submit page, when there is one.
async function api(path, { method = "GET", json, body } = {}) {
  const headers = new Headers();
  const token = localStorage.getItem(TOKEN_KEY);
  if (token && method !== "GET") headers.set("Authorization", `Bearer ${token}`);
  if (json !== undefined) {
    headers.set("Content-Type", "application/json");
    body = JSON.stringify(json);
  }
  const where = `${method} ${path}`;
  let response;
  try {
    response = await fetch(path, { method, headers, body });
  } catch (error) {
    throw new ApiError(0, `cannot reach the cn4 server (${error.message}): check that cn4 serve is running`, where);
  }
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch (error) {
    data = null;
  }
  if (!response.ok) {
    let detail = response.statusText || "request failed";
    if (data && typeof data.detail === "string") detail = data.detail;
    else if (data && data.detail) detail = JSON.stringify(data.detail);
    else if (text) detail = text.slice(0, 300);
    throw new ApiError(response.status, detail, where);
  }
  return data;
}

// Build an element: el("td", {class: "number"}, "1.5"). Text goes in as text, never as HTML.
function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

// Show an error (ApiError or any Error) as a readable message inside `container`.
function showError(container, error) {
  const where = error.where ? ` (${error.where}${error.status ? `, HTTP ${error.status}` : ""})` : "";
  container.replaceChildren(el("div", { class: "error", role: "alert" }, `${error.message}${where}`));
  // Anything else is a bug in the page: keep its stack trace in the console.
  if (!(error instanceof ApiError || error instanceof PageError)) console.error(error);
}

function showNotice(container, ...content) {
  container.replaceChildren(el("div", { class: "notice", role: "status" }, ...content));
}

function clear(container) {
  container.replaceChildren();
}

function formatNumber(value, digits = 4) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  // Round to `digits` significant digits and drop trailing zeros: 0.001, not 0.001000.
  return String(Number(Number(value).toPrecision(digits)));
}

function formatMs(value) {
  return value === null || value === undefined ? "–" : `${formatNumber(value)} ms`;
}

function formatShare(value) {
  return value === null || value === undefined ? "–" : `${(100 * value).toFixed(1)}%`;
}

function describeLevel(level) {
  return `${level} zeros / ${GROUP_SIZE - level} kept`;
}

function stateBadge(state) {
  return el("span", { class: `state state-${state}`, "data-state": state }, state);
}

// The budget of a job spec in words.
function describeBudget(spec) {
  if (spec.budget_ms !== null && spec.budget_ms !== undefined) return `${spec.budget_ms} ms`;
  const parts = [];
  if (spec.budget_ratio !== null && spec.budget_ratio !== undefined) parts.push(`${spec.budget_ratio} × dense`);
  if (spec.sparsity_target !== null && spec.sparsity_target !== undefined) parts.push(`sparsity ≥ ${spec.sparsity_target}`);
  return parts.length ? parts.join(", ") : "0.6 × dense (default)";
}

// Split a layer name into its block number (or null) and the rest, e.g.
// "backbone.layers.12.mixer.in_proj" -> {block: 12, kind: "mixer.in_proj"}.
function splitLayerName(name) {
  const match = /^(.*?\.)?layers\.(\d+)\.(.+)$/.exec(name);
  if (!match) return { block: null, kind: name };
  return { block: Number(match[2]), kind: match[3] };
}

// Order layer names as the model does: blocks by number, then the layers outside blocks.
// `modelOrder` (names from GET /v1/models/{name}) wins where it is known.
function orderLayers(names, modelOrder) {
  if (modelOrder && names.every((name) => modelOrder.has(name))) {
    return [...names].sort((a, b) => modelOrder.get(a) - modelOrder.get(b));
  }
  return [...names].sort((a, b) => {
    const left = splitLayerName(a);
    const right = splitLayerName(b);
    const leftBlock = left.block === null ? Infinity : left.block;
    const rightBlock = right.block === null ? Infinity : right.block;
    if (leftBlock !== rightBlock) return leftBlock - rightBlock;
    return a.localeCompare(b);
  });
}

function queryParameter(name) {
  return new URLSearchParams(window.location.search).get(name);
}

function setQueryParameter(name, value) {
  const url = new URL(window.location.href);
  if (value === null || value === "") url.searchParams.delete(name);
  else url.searchParams.set(name, value);
  window.history.replaceState(null, "", url);
}

// Plotly layout settings shared by every plot.
function basePlotLayout(extra) {
  return Object.assign(
    {
      margin: { l: 70, r: 20, t: 50, b: 60 },
      hovermode: "closest",
      legend: { orientation: "h", x: 0, y: 1.02, yanchor: "bottom" },
      font: { family: "system-ui, sans-serif", size: 12 },
    },
    extra,
  );
}

const PLOT_CONFIG = { displaylogo: false, responsive: true };
