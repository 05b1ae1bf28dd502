// onnxpipe web package: the model in the browser with onnxruntime-web's WASM execution provider.
// Everything it loads is in this folder (config.json, the model, ort/ vendored from the npm registry at
// package time): serve the folder from any static server and it works offline.
//
// window.onnxpipe is the page's small API, used by the UI below and by `onnxpipe package --check`:
//   ready          a promise, resolved when the session is created
//   run(values, dims)               one call -> {logits, ms}
//   runRows(rows, rowDims)          every row alone (batch 1), as the UI does -> {outputs, ms}
//   bench(values, dims, n, warmup)  n timed calls -> {median_ms, p90_ms, runs}
//   preprocessURL(url)              an image file -> the model input the page would feed (normalized)
//   show(values)                    put an input through the UI (canvas, bars, latency)
import * as ort from "./ort/ort.wasm.min.mjs";
import { denormalize, imageToInput } from "./preprocess.js";

const config = await (await fetch("./config.json")).json();
ort.env.wasm.wasmPaths = new URL("./ort/", import.meta.url).href;
ort.env.wasm.numThreads = config.ort_web.threads; // 1: no cross-origin isolation needed to serve the folder
ort.env.wasm.proxy = false;

const input = config.inputs[0];
const $ = (id) => document.getElementById(id);
const status = (text) => { $("status").textContent = text; };

function tensor(values, dims) {
  if (input.dtype === "int64") return new ort.Tensor("int64", BigInt64Array.from(values, (v) => BigInt(Math.round(v))), dims);
  return new ort.Tensor("float32", Float32Array.from(values), dims);
}

let session;
async function run(values, dims) {
  const feeds = { [input.name]: tensor(values, dims) };
  const t0 = performance.now();
  const result = await session.run(feeds);
  const ms = performance.now() - t0;
  const out = result[config.outputs[0].name];
  return { logits: Array.from(out.data, Number), dims: out.dims, ms };
}

async function runRows(rows, rowDims) {
  const outputs = [], ms = [];
  for (const row of rows) {
    const r = await run(row, [1, ...rowDims]);
    outputs.push(r.logits);
    ms.push(r.ms);
  }
  return { outputs, ms };
}

function quantile(sorted, q) {
  const pos = (sorted.length - 1) * q, lo = Math.floor(pos), hi = Math.ceil(pos);
  return sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo);
}

async function bench(values, dims, n = 50, warmup = 5) {
  for (let i = 0; i < warmup; i++) await run(values, dims);
  const ms = [];
  for (let i = 0; i < n; i++) ms.push((await run(values, dims)).ms);
  ms.sort((a, b) => a - b);
  return { median_ms: quantile(ms, 0.5), p90_ms: quantile(ms, 0.9), runs: n };
}

// --- the UI -------------------------------------------------------------------------------------------
const canvas = $("pad");
const ctx = canvas.getContext("2d", { willReadFrequently: true });

function clearPad() {
  ctx.fillStyle = "black";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
}

function rgbaOf(image) {
  // An image as RGBA bytes, composited over white (transparent pixels are paper, as in `onnxpipe predict`).
  const c = document.createElement("canvas");
  c.width = image.naturalWidth || image.width;
  c.height = image.naturalHeight || image.height;
  const g = c.getContext("2d", { willReadFrequently: true });
  g.fillStyle = "white";
  g.fillRect(0, 0, c.width, c.height);
  g.drawImage(image, 0, 0);
  return { rgba: g.getImageData(0, 0, c.width, c.height).data, width: c.width, height: c.height };
}

function drawInput(values) {
  // The input's pixels (model grid, de-normalized) scaled up onto the pad.
  const [gh, gw] = config.image.grid;
  const px = denormalize(values, config.normalization);
  const cw = canvas.width / gw, ch = canvas.height / gh;
  for (let y = 0; y < gh; y++) {
    for (let x = 0; x < gw; x++) {
      const v = Math.round(255 * px[y * gw + x]);
      ctx.fillStyle = `rgb(${v},${v},${v})`;
      ctx.fillRect(x * cw, y * ch, Math.ceil(cw), Math.ceil(ch));
    }
  }
}

function softmax(logits) {
  const m = Math.max(...logits);
  const e = logits.map((v) => Math.exp(v - m));
  const s = e.reduce((a, b) => a + b, 0);
  return e.map((v) => v / s);
}

function showResult(r) {
  const p = softmax(r.logits);
  const best = p.indexOf(Math.max(...p));
  const bars = $("bars");
  bars.textContent = "";
  p.forEach((q, i) => {
    const row = document.createElement("div");
    row.className = "bar" + (i === best ? " best" : "");
    row.innerHTML = `<span class="label"></span><span class="fill"></span><span class="value"></span>`;
    row.querySelector(".label").textContent = config.labels[i] ?? String(i);
    row.querySelector(".fill").style.width = `${(100 * q).toFixed(1)}%`;
    row.querySelector(".value").textContent = q.toFixed(3);
    bars.appendChild(row);
  });
  $("answer").textContent = `class ${config.labels[best] ?? best} (p=${p[best].toFixed(3)})`;
  $("latency").textContent = `last call: ${r.ms.toFixed(2)} ms (WASM, ${config.ort_web.threads} thread)`;
}

async function show(values) {
  if (config.image) drawInput(values);
  const r = await run(values, [1, ...input.shape]);
  showResult(r);
  return r;
}

async function fromPad() {
  const { data } = ctx.getImageData(0, 0, canvas.width, canvas.height);
  const values = imageToInput(data, canvas.width, canvas.height, config, { invert: "no" });
  showResult(await run(values, [1, ...input.shape]));
}

async function fromImage(image) {
  const { rgba, width, height } = rgbaOf(image);
  const values = imageToInput(rgba, width, height, config);
  await show(values);
}

async function preprocessURL(url) {
  const image = new Image();
  image.src = url;
  await image.decode();
  const { rgba, width, height } = rgbaOf(image);
  return Array.from(imageToInput(rgba, width, height, config));
}

function setupUI() {
  $("title").textContent = `${config.model_name} (${config.variant})`;
  $("meta").textContent = `onnxruntime-web ${config.ort_web.version}, WASM execution provider; input ` +
    `${input.name} ${input.dtype} [${input.dims.join(", ")}]; normalization (x * ${config.normalization.scale.toPrecision(4)} - ` +
    `${config.normalization.mean.toPrecision(4)}) / ${config.normalization.std.toPrecision(4)} from run ${config.source_run}`;
  const pick = $("examples");
  config.examples.forEach((ex, i) => {
    const o = document.createElement("option");
    o.value = String(i);
    o.textContent = `reference input ${i} (label ${config.labels[ex.label] ?? ex.label})`;
    pick.appendChild(o);
  });
  pick.addEventListener("change", () => show(config.examples[Number(pick.value)].input));
  if (!config.image) {
    for (const id of ["drawing", "drop"]) $(id).hidden = true;
    return;
  }
  clearPad();
  let drawing = false;
  const at = (e) => {
    const b = canvas.getBoundingClientRect();
    return [(e.clientX - b.left) * canvas.width / b.width, (e.clientY - b.top) * canvas.height / b.height];
  };
  canvas.addEventListener("pointerdown", (e) => { drawing = true; ctx.beginPath(); ctx.moveTo(...at(e)); });
  canvas.addEventListener("pointermove", (e) => {
    if (!drawing) return;
    ctx.strokeStyle = "white";
    ctx.lineWidth = canvas.width / 10;
    ctx.lineCap = ctx.lineJoin = "round";
    ctx.lineTo(...at(e));
    ctx.stroke();
  });
  const done = () => { if (drawing) { drawing = false; fromPad(); } };
  canvas.addEventListener("pointerup", done);
  canvas.addEventListener("pointerleave", done);
  $("clear").addEventListener("click", () => { clearPad(); $("bars").textContent = ""; $("answer").textContent = ""; });
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => e.preventDefault());
  drop.addEventListener("drop", async (e) => {
    e.preventDefault();
    const file = e.dataTransfer.files[0];
    if (!file) return;
    const image = new Image();
    image.src = URL.createObjectURL(file);
    await image.decode();
    await fromImage(image);
  });
  $("file").addEventListener("change", async (e) => {
    const file = e.target.files[0];
    if (!file) return;
    const image = new Image();
    image.src = URL.createObjectURL(file);
    await image.decode();
    await fromImage(image);
  });
}

const ready = (async () => {
  status("loading the model ...");
  session = await ort.InferenceSession.create(`./${config.model}`, {
    executionProviders: ["wasm"], graphOptimizationLevel: "all",
  });
  setupUI();
  status(`ready: ${config.model} (${config.model_bytes.toLocaleString()} bytes)`);
  if (config.examples.length) await show(config.examples[0].input);
})();

window.onnxpipe = { ready, config, run, runRows, bench, preprocessURL, show, ort };
ready.catch((e) => status(`error: ${e.message || e}`));
