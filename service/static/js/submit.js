// The submit page: one job from a form, a batch from a file, and the API token.
"use strict";

const form = document.getElementById("job-form");
const jobMessages = document.getElementById("job-messages");
const batchMessages = document.getElementById("batch-messages");
const INTEGER_FIELDS = ["trials", "seed", "calibration_windows", "window", "evaluation_windows", "proxy_windows"];

async function loadChoices() {
  try {
    const [models, devices] = await Promise.all([api("/v1/models"), api("/v1/devices")]);
    document.getElementById("model").replaceChildren(...models.map((model) => el("option", { value: model.name }, model.name === "default" ? "default (embedded)" : `${model.name} (${model.arch || "?"})`)));
    document.getElementById("device-names").replaceChildren(
      el("option", { value: "local" }),
      ...devices.map((device) => el("option", { value: device.name }, `${device.measurement_count} measurements`)),
    );
  } catch (error) {
    showError(jobMessages, error);
  }
}

// Read a number field as typed; the API rejects what is invalid, with a message naming the fix.
function numberField(name) {
  const text = form.elements[name].value.trim();
  if (text === "") return null;
  const value = Number(text);
  return Number.isNaN(value) ? text : value;
}

function specFromForm() {
  const spec = {
    model: form.elements.model.value,
    device: form.elements.device.value.trim(),
    levels: [...form.querySelectorAll("input[name=level]:checked")].map((box) => Number(box.value)),
    method: form.elements.method.value,
    objective: form.elements.objective.value,
    measure: form.elements.measure.checked,
  };
  spec[form.elements["budget-kind"].value] = numberField("budget");
  for (const name of INTEGER_FIELDS) {
    const value = numberField(name);
    if (value !== null) spec[name] = value;
  }
  return spec;
}

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  const body = { spec: specFromForm() };
  const key = form.elements.idempotency_key.value.trim();
  if (key) body.idempotency_key = key;
  try {
    const job = await api("/v1/jobs", { method: "POST", json: body });
    showNotice(jobMessages, `Job ${job.id} is ${job.state}: `, el("a", { href: `/jobs/${job.id}`, id: "new-job-link" }, `open job #${job.id}`));
  } catch (error) {
    showError(jobMessages, error);
  }
});

document.getElementById("batch-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const file = document.getElementById("batch-file").files[0];
  if (!file) {
    showError(batchMessages, new PageError("no file chosen: choose a YAML or JSON Lines batch file"));
    return;
  }
  try {
    const upload = new FormData();
    upload.append("file", file, file.name);
    const parsed = await api("/dashboard/batch-file", { method: "POST", body: upload });
    const batch = await api("/v1/jobs/batch", { method: "POST", json: { jobs: parsed.jobs } });
    const links = batch.jobs.map((item, index) =>
      el("li", {}, `line ${parsed.lines[index]}: `, el("a", { href: `/jobs/${item.id}` }, `job #${item.id}`), item.created ? "" : " (already submitted)"),
    );
    batchMessages.replaceChildren(el("div", { class: "notice", role: "status" }, `${batch.created} of ${batch.jobs.length} jobs created from ${file.name}.`, el("ul", {}, ...links)));
  } catch (error) {
    showError(batchMessages, error);
  }
});

document.getElementById("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const token = document.getElementById("token").value.trim();
  if (token) localStorage.setItem(TOKEN_KEY, token);
  else localStorage.removeItem(TOKEN_KEY);
  showTokenState();
});

function showTokenState() {
  document.getElementById("token-state").textContent = localStorage.getItem(TOKEN_KEY) ? "a token is saved" : "no token saved";
}

showTokenState();
loadChoices();
