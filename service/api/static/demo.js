// The page at /: pick a model, send each image as its own POST /{model}/predict request (so a
// broken one fails alone), show its top-k classes as bars, the latency, and the server's errors.
"use strict";

const state = { models: [], files: [], thumbnails: [], run: 0 };
const $ = (id) => document.getElementById(id);

function element(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (name === "text") node.textContent = value;
    else node.setAttribute(name, value);
  }
  node.append(...children);
  return node;
}

function percent(probability) {
  return `${(probability * 100).toFixed(2)} %`;
}

function selectedModel() {
  return state.models.find((model) => model.name === $("model").value);
}

function showFacts(model) {
  const facts = $("facts");
  facts.replaceChildren();
  const warning = $("warning");
  warning.hidden = true;
  if (!model) return;
  const weights = model.weights;
  const rows = [
    ["Architecture", model.architecture],
    ["Device", model.device],
    ["Data type", model.dtype],
    ["Runtime", model.runtime],
    ["Weights", `${weights.description} (origin: ${weights.origin})`],
    ["Weights file", weights.file],
    ["sha256", weights.sha256],
  ];
  for (const [term, value] of rows) {
    facts.append(element("dt", { text: term }), element("dd", { text: value ?? "unknown" }));
  }
  facts.lastElementChild.classList.add("hash");
  if (weights.origin === "random-init") {
    warning.replaceChildren(
      `${model.name} serves random-init weights (${weights.description}): its answers are meaningless. ` +
        "Fetch the official checkpoint with ",
      element("code", { text: `resnet-serve weights fetch ${model.name}` }),
      ".",
    );
    warning.hidden = false;
  }
}

async function loadModels() {
  const select = $("model");
  try {
    const response = await fetch("/models");
    const body = await response.json();
    state.models = body.models ?? [];
  } catch (error) {
    $("status").textContent = `Could not list the models: ${error.message}`;
    return;
  }
  select.replaceChildren(...state.models.map((m) => element("option", { value: m.name, text: m.name })));
  if (state.models.length === 0) {
    select.append(element("option", { value: "", text: "none loaded yet" }));
    $("status").textContent = "No model is loaded yet: the server is starting. Reload the page in a moment.";
    return;
  }
  select.disabled = false;
  onModelChange();
}

function onModelChange() {
  const model = selectedModel();
  showFacts(model);
  if (model) $("topk").max = String(model.num_classes);
  classifyAll();
}

// The server's own words: its JSON error `message`, and Retry-After on a 429.
async function errorText(response) {
  let message = response.statusText || "request failed";
  let type = "";
  try {
    const body = await response.json();
    if (typeof body.message === "string") message = body.message;
    if (typeof body.type === "string") type = ` ${body.type}`;
  } catch {
    // not our JSON (a proxy's page): the status line says what there is to say
  }
  let text = `HTTP ${response.status}${type}: ${message}`;
  const retryAfter = response.headers.get("Retry-After");
  if (response.status === 429 && retryAfter) text += ` Retry after ${retryAfter} s.`;
  return text;
}

function resultItem(file, thumbnail) {
  const image = element("img", { src: thumbnail, alt: `Uploaded image ${file.name}`, class: "thumbnail" });
  // A file the browser cannot show either (the server will say why): a plain box, not a broken icon.
  image.addEventListener("error", () =>
    image.replaceWith(
      element("div", { class: "thumbnail placeholder", role: "img", "aria-label": `No preview of ${file.name}`, text: "no preview" }),
    ),
  );
  const caption = element("p", { class: "name", text: file.name });
  const outcome = element("div", { class: "outcome", text: "Classifying…" });
  const item = element("li", { class: "result", "aria-busy": "true" }, image, element("div", { class: "body" }, caption, outcome));
  return { item, outcome };
}

function showPrediction(outcome, classes, latencyMs, modelName) {
  const bars = element("ul", { class: "bars", "aria-label": `Top ${classes.length} classes from ${modelName}` });
  for (const { class: label, probability } of classes) {
    const fill = element("span", { class: "fill" });
    fill.style.width = `${Math.max(probability * 100, 0.5)}%`;
    bars.append(
      element(
        "li",
        { class: "bar", "data-class": label, "data-probability": String(probability) },
        element("span", { class: "label", text: label }),
        element("span", { class: "probability", text: percent(probability) }),
        element("span", { class: "track", "aria-hidden": "true" }, fill),
      ),
    );
  }
  const latency = element("p", { class: "latency", text: `${modelName} answered in ${Math.round(latencyMs)} ms` });
  outcome.replaceChildren(bars, latency);
}

async function classify(file, outcome, modelName, topk, run) {
  const form = new FormData();
  form.append("data", file, file.name);
  const started = performance.now();
  let text;
  try {
    const response = await fetch(`/${encodeURIComponent(modelName)}/predict?topk=${topk}`, { method: "POST", body: form });
    if (response.ok) {
      const body = await response.json();
      if (run !== state.run) return false;
      showPrediction(outcome, body.prediction[0], performance.now() - started, modelName);
      return true;
    }
    text = await errorText(response);
  } catch (error) {
    text = `Could not reach the server: ${error.message}`;
  }
  if (run !== state.run) return false;
  outcome.replaceChildren(element("p", { class: "error", text }));
  return false;
}

async function classifyAll() {
  const model = selectedModel();
  if (!model || state.files.length === 0) return;
  const topkInput = $("topk");
  if (!topkInput.checkValidity()) {
    $("status").textContent = `topk must be a whole number from 1 to ${topkInput.max}.`;
    return;
  }
  const run = ++state.run;
  const topk = Number(topkInput.value);
  const list = $("results");
  list.replaceChildren();
  $("status").textContent = `Classifying ${state.files.length} image(s) with ${model.name}…`;
  const jobs = state.files.map((file, index) => {
    const { item, outcome } = resultItem(file, state.thumbnails[index]);
    list.append(item);
    return classify(file, outcome, model.name, topk, run).finally(() => item.removeAttribute("aria-busy"));
  });
  const outcomes = await Promise.all(jobs);
  if (run !== state.run) return;
  const failed = outcomes.filter((ok) => !ok).length;
  $("status").textContent =
    `Classified ${outcomes.length - failed} of ${outcomes.length} image(s) with ${model.name}` +
    (failed ? `; ${failed} failed, see below.` : ".");
}

function useFiles(fileList) {
  const files = Array.from(fileList ?? []);
  if (files.length === 0) return;
  state.thumbnails.forEach((url) => URL.revokeObjectURL(url));
  state.files = files;
  state.thumbnails = files.map((file) => URL.createObjectURL(file));
  classifyAll();
}

function setUp() {
  const grafana = document.documentElement.dataset.grafanaUrl;
  if (grafana) {
    $("grafana-link").href = grafana;
    $("grafana-item").hidden = false;
  }
  const pick = $("pick");
  const input = $("files");
  pick.addEventListener("click", () => input.click());
  input.addEventListener("change", () => {
    useFiles(input.files);
    input.value = ""; // choosing the same file again still fires `change`
  });
  pick.addEventListener("dragover", (event) => {
    event.preventDefault();
    pick.classList.add("dragging");
  });
  pick.addEventListener("dragleave", () => pick.classList.remove("dragging"));
  pick.addEventListener("drop", (event) => {
    event.preventDefault();
    pick.classList.remove("dragging");
    useFiles(event.dataTransfer.files);
  });
  document.addEventListener("paste", (event) => {
    const files = Array.from(event.clipboardData?.files ?? []).filter((f) => f.type.startsWith("image/"));
    if (files.length > 0) useFiles(files);
  });
  $("model").addEventListener("change", onModelChange);
  $("topk").addEventListener("change", classifyAll);
  loadModels();
}

setUp();
