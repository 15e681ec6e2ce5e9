// Whetstone's frontend: a live loss chart and status line on the Train node (from "whetstone.progress" websocket
// events), a strip of its latest preview images with a slider over the steps ("whetstone.preview"), and the text a
// node returns in its `ui` (plan table, pack report, hardware summary) shown inside the node.
// Uses only documented hooks: beforeRegisterNodeDef (for our own node types), nodeCreated, api events.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { decodedSteps } from "./whetstone_job_previews.js";

const TEXT_NODES = new Set([
  "WhetstonePackDataset",
  "WhetstoneHardwareProfile",
  "WhetstoneTrainingPlan",
  "WhetstoneTrain",
  "WhetstoneLoadTrainedLoRA",
]);
const TRAIN_NODE = "WhetstoneTrain";
// The nodes that show a run's preview strip: Train, and Wait for Run (it decodes a background run's previews).
const PREVIEW_NODES = new Set([TRAIN_NODE, "WhetstoneWaitForRun"]);
// The plan's table keeps its columns (the node is sized for it, and widens to its longest line); every other panel
// wraps its lines, long paths included, so it never grows sideways into its neighbours.
const TABLE_NODES = new Set(["WhetstoneTrainingPlan"]);
const CHAR_WIDTH = 6.1; // 10 px monospace, rounded up
const MAX_POINTS = 5000;
const TEXT_LINE_HEIGHT = 13; // 10 px font, line-height 1.3
const TEXT_MAX_HEIGHT = 260;
const DOM_WIDGET_MARGIN = 10;

function formatDuration(seconds) {
  if (seconds == null || !isFinite(seconds)) return "–";
  const s = Math.max(0, Math.round(seconds));
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  return h > 0 ? `${h}h${String(m).padStart(2, "0")}m` : `${m}m${String(s % 60).padStart(2, "0")}s`;
}

function addPanel(node, name, element, minHeight) {
  const widget = node.addDOMWidget(name, "whetstone_panel", element, {
    serialize: false,
    hideOnZoom: false,
    getValue() { return undefined; },
    setValue() {},
    getMinHeight: typeof minHeight === "function" ? minHeight : () => minHeight,
  });
  widget.serialize = false; // keep widgets_values aligned with the Python inputs
  return widget;
}

function addTextPanel(node, wrap) {
  const pre = document.createElement("pre");
  pre.className = "whetstone-text";
  Object.assign(pre.style, {
    margin: "0", padding: "4px", fontSize: "10px", lineHeight: "1.3", overflow: "auto",
    whiteSpace: wrap ? "pre-wrap" : "pre", overflowWrap: wrap ? "anywhere" : "normal",
    color: "var(--input-text, #ddd)", background: "var(--comfy-input-bg, #222)", maxHeight: `${TEXT_MAX_HEIGHT}px`,
  });
  addPanel(node, "whetstone_text", pre, () => textPanelHeight(node, pre, wrap));
  node.whetstoneText = pre;
  node.whetstoneWrap = wrap;
}

// The frontend gives a DOM widget its min height less a 10 px margin above and below; the text needs its lines
// (wrapped at the node's width when the panel wraps), the padding and room for a horizontal scrollbar, up to the
// <pre>'s max height. No text yet: no empty box.
function textPanelHeight(node, pre, wrap) {
  if (!pre.textContent) return 2 * DOM_WIDGET_MARGIN;
  const perLine = Math.max(1, Math.floor((node.size[0] - 2 * DOM_WIDGET_MARGIN - 8) / CHAR_WIDTH));
  const lines = pre.textContent.split("\n")
    .reduce((count, line) => count + (wrap ? Math.max(1, Math.ceil(line.length / perLine)) : 1), 0);
  return Math.min(TEXT_MAX_HEIGHT, lines * TEXT_LINE_HEIGHT + 8 + 16) + 2 * DOM_WIDGET_MARGIN;
}

// Grow (never shrink) the node so a text that just arrived is visible; a table also widens to its longest line.
function fitNodeToContent(node) {
  const needed = node.computeSize?.();
  if (!needed) return;
  const table = node.whetstoneText && !node.whetstoneWrap;
  const textWidth = table ? node.whetstoneText.scrollWidth + 2 * DOM_WIDGET_MARGIN : 0;
  node.setSize?.([Math.max(node.size[0], needed[0], textWidth), Math.max(node.size[1], needed[1])]);
  node.setDirtyCanvas?.(true, true);
}

function addChartPanel(node) {
  const box = document.createElement("div");
  box.className = "whetstone-chart";
  const status = document.createElement("div");
  Object.assign(status.style, { fontSize: "11px", fontFamily: "monospace", color: "var(--input-text, #ddd)" });
  status.textContent = "waiting for training…";
  const canvas = document.createElement("canvas");
  canvas.width = 400;
  canvas.height = 160;
  Object.assign(canvas.style, { width: "100%", height: "160px", background: "#18181b", borderRadius: "4px" });
  box.append(status, canvas);
  addPanel(node, "whetstone_chart", box, 190);
  node.whetstoneChart = { canvas, status, points: [], run: null };
}

function drawChart(chart) {
  const { canvas, points } = chart;
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height, pad = 28;
  ctx.clearRect(0, 0, w, h);
  ctx.strokeStyle = "#555";
  ctx.strokeRect(pad, 6, w - pad - 6, h - pad);
  const finite = points.filter((p) => p[1] != null && isFinite(p[1]) && p[1] > 0);
  if (finite.length === 0) return;
  const xs = finite.map((p) => p[0]), ys = finite.map((p) => Math.log10(p[1]));
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1);
  let y0 = Math.min(...ys), y1 = Math.max(...ys);
  if (y1 - y0 < 1e-6) { y0 -= 0.5; y1 += 0.5; }
  const px = (x) => pad + ((x - x0) / (x1 - x0)) * (w - pad - 8);
  const py = (y) => 6 + (1 - (y - y0) / (y1 - y0)) * (h - pad - 2);
  ctx.strokeStyle = "rgba(96,165,250,0.45)";
  ctx.beginPath();
  finite.forEach((p, i) => (i ? ctx.lineTo : ctx.moveTo).call(ctx, px(p[0]), py(Math.log10(p[1]))));
  ctx.stroke();
  const span = Math.max(1, Math.floor(finite.length / 50));
  ctx.strokeStyle = "#fb923c";
  ctx.beginPath();
  let sum = 0;
  finite.forEach((p, i) => {
    sum += p[1];
    if (i >= span) sum -= finite[i - span][1];
    const mean = sum / Math.min(i + 1, span);
    (i ? ctx.lineTo : ctx.moveTo).call(ctx, px(p[0]), py(Math.log10(mean)));
  });
  ctx.stroke();
  ctx.fillStyle = "#aaa";
  ctx.font = "10px monospace";
  ctx.fillText(`${(10 ** y1).toPrecision(3)}`, 2, 14);
  ctx.fillText(`${(10 ** y0).toPrecision(3)}`, 2, h - pad);
  ctx.fillText(`step ${x0}`, pad, h - 8);
  ctx.fillText(`${x1}`, w - 40, h - 8);
}

function statusLine(detail) {
  const parts = [];
  if (detail.step != null) parts.push(`step ${detail.step}/${detail.total_steps ?? "?"}`);
  if (detail.loss != null) parts.push(`loss ${Number(detail.loss).toFixed(4)}`);
  if (detail.img_per_s != null) parts.push(`${Number(detail.img_per_s).toFixed(2)} img/s`);
  parts.push(`ETA ${formatDuration(detail.eta_s)}`);
  if (detail.peak_mem_gb != null) parts.push(`mem ${Number(detail.peak_mem_gb).toFixed(1)} GB`);
  return parts.join(" · ");
}

function onProgress(event) {
  const detail = event.detail || {};
  const node = app.graph?.getNodeById?.(detail.node);
  const chart = node?.whetstoneChart;
  if (!chart) return;
  if (detail.kind === "start" || chart.run !== detail.run) {
    stopFollowing(node); // the node runs in the foreground now
    chart.points = [];
    chart.run = detail.run;
    chart.ended = null;
  }
  if (Array.isArray(detail.points)) {
    chart.points.push(...detail.points);
    if (chart.points.length > MAX_POINTS) chart.points.splice(0, chart.points.length - MAX_POINTS);
  }
  if (detail.kind === "end") {
    chart.status.textContent = detail.message || detail.state;
    chart.ended = { run: detail.run, text: chart.status.textContent }; // says what was saved: a reconnect keeps it
    loadHistory(node, true); // every point the run wrote, including any sent while the page was away
  } else if (detail.kind === "stopping") {
    chart.status.textContent = detail.message || "stopping…";
  } else if (detail.kind === "start") {
    chart.status.textContent = `starting ${detail.run}: ${detail.total_steps} steps…`;
  } else {
    chart.status.textContent = statusLine(detail);
  }
  drawChart(chart);
  node.setDirtyCanvas?.(true, false);
}

// The run's history from its folder (GET /whetstone/run_history): after a browser reload or a reconnect the chart
// shows the whole curve again, and after the end every point the run wrote.
const FINISHED = new Set(["completed", "stopped", "failed"]);

// The run's history, or undefined (an invalid name: the node itself says so when queued; or the server is away).
async function fetchHistory(run) {
  try {
    const response = await api.fetchApi(`/whetstone/run_history?run=${encodeURIComponent(run)}`);
    return response.ok ? await response.json() : undefined;
  } catch (error) {
    console.warn("whetstone: could not read the run's history", error);
    return undefined;
  }
}

async function loadHistory(node, keepStatus = false) {
  const chart = node?.whetstoneChart;
  const run = node?.widgets?.find((w) => w.name === "run_name")?.value;
  if (!chart || !run || chart.background) return; // a background job's chart follows the job (followBackground)
  const history = await fetchHistory(run);
  if (!history?.points?.length) return;
  if (chart.run === run && chart.points.length > history.points.length) return; // live data is newer
  chart.run = run;
  chart.points = history.points.slice(-MAX_POINTS);
  const endSeen = chart.ended?.run === run && FINISHED.has(history.state); // this page saw the end: its words stay
  if (!keepStatus && !endSeen) {
    chart.status.textContent = FINISHED.has(history.state)
      ? history.message
      : `step ${history.step} (${history.state || "running"}; history read from the run folder)`;
  }
  drawChart(chart);
  node.setDirtyCanvas?.(true, false);
}

// A background job (the Train node's ui names it: "whetstone_background") trains in a process of its own, which
// sends no events: the chart polls the run's history until the job's status is a finished one written after the
// job was queued (an earlier run of the folder may have left one), or until the node is removed or runs again.
const BACKGROUND_POLL_MS = 3000;

function followBackground(node, job) {
  const chart = node.whetstoneChart;
  if (!chart || typeof job?.run !== "string") return;
  stopFollowing(node);
  const follow = { run: job.run, total: job.total_steps, since: job.submitted_at, timer: null };
  chart.background = follow;
  chart.run = job.run;
  chart.points = [];
  chart.status.textContent = `background job ${job.run}: waiting for it to start…`;
  if (node.whetstonePreviews) resetPreviews(node.whetstonePreviews, job.run); // an earlier job's steps go
  drawChart(chart);
  const poll = async () => {
    const history = await fetchHistory(follow.run);
    if (chart.background !== follow) return; // removed or run again while the request was out
    const finished = history && showBackground(node, follow, history);
    const decoding = showBackgroundPreviews(node, follow.run, await fetchPreviews(follow.run));
    if (chart.background !== follow) return;
    if (finished && !decoding) {
      chart.background = null;
      return;
    }
    follow.timer = setTimeout(poll, BACKGROUND_POLL_MS);
  };
  poll();
}

function stopFollowing(node) {
  const chart = node?.whetstoneChart;
  if (!chart?.background) return;
  clearTimeout(chart.background.timer);
  chart.background = null;
}

// Draws a background job's history; true once the job has finished.
function showBackground(node, follow, history) {
  const chart = node.whetstoneChart;
  const stale = history.updated != null && follow.since != null && history.updated < follow.since;
  const finished = FINISHED.has(history.state) && !stale;
  if (Array.isArray(history.points)) chart.points = history.points.slice(-MAX_POINTS);
  const of = `${history.step ?? 0} of ${follow.total ?? "?"}`;
  if (finished) {
    chart.status.textContent = `${history.message || history.state} (background job ${follow.run}: step ${of})`;
  } else if (history.step != null) {
    const last = chart.points[chart.points.length - 1];
    const loss = last?.[1] != null ? ` · loss ${Number(last[1]).toFixed(4)}` : "";
    chart.status.textContent = `step ${of}${loss} (running in the background: job ${follow.run})`;
  } else {
    const state = !stale && history.state ? history.state : "queued";
    chart.status.textContent = `background job ${follow.run}: ${state}, no step yet`;
  }
  drawChart(chart);
  node.setDirtyCanvas?.(true, false);
  return finished;
}

// Previews ("whetstone.preview": images the Train or Wait for Run node decoded into ComfyUI's temp folder; for a
// background job, the steps GET /whetstone/jobs/previews lists as decoded): a strip of the prompts' images at one
// preview step, the latest by default, and a slider over the steps seen so far.
const MAX_PREVIEW_STEPS = 200;

// The background job's preview steps (nodes/preview_jobs.py; asking queues the ones not decoded yet), or undefined.
async function fetchPreviews(run) {
  try {
    const response = await api.fetchApi(`/whetstone/jobs/previews?run=${encodeURIComponent(run)}`);
    return response.ok ? await response.json() : undefined;
  } catch (error) {
    console.warn("whetstone: could not read the run's previews", error);
    return undefined;
  }
}

// Adds the job's newly decoded steps to the node's strip; true while some step is still being decoded.
function showBackgroundPreviews(node, run, body) {
  const previews = node.whetstonePreviews;
  if (!previews || !Array.isArray(body?.steps)) return false;
  if (previews.run !== run) resetPreviews(previews, run);
  const { added, decoding } = decodedSteps(body, new Set(previews.steps.map((entry) => entry.step)));
  if (added.length) {
    previews.steps.push(...added);
    previews.steps.sort((a, b) => a.step - b.step);
    showNewPreviews(node);
  }
  return decoding;
}

function resetPreviews(previews, run) {
  previews.steps = [];
  previews.run = run;
  previews.follow = true;
}

function addPreviewPanel(node) {
  const box = document.createElement("div");
  box.className = "whetstone-previews";
  Object.assign(box.style, {
    display: "none", fontSize: "11px", fontFamily: "monospace", color: "var(--input-text, #ddd)",
  });
  const label = document.createElement("div");
  const slider = document.createElement("input");
  slider.type = "range";
  slider.min = "0";
  slider.max = "0";
  slider.style.width = "100%";
  const strip = document.createElement("div");
  Object.assign(strip.style, { display: "flex", gap: "4px", overflowX: "auto" });
  box.append(label, slider, strip);
  const height = () => (node.whetstonePreviews?.steps.length ? 200 : 2 * DOM_WIDGET_MARGIN);
  addPanel(node, "whetstone_previews", box, height);
  const previews = { box, label, slider, strip, steps: [], run: null, follow: true };
  slider.addEventListener("input", () => {
    previews.follow = Number(slider.value) === previews.steps.length - 1;
    showPreviewStep(previews, Number(slider.value));
  });
  node.whetstonePreviews = previews;
}

function showPreviewStep(previews, index) {
  const entry = previews.steps[index];
  if (!entry) return;
  previews.label.textContent = `previews at step ${entry.step} (${index + 1}/${previews.steps.length})`;
  previews.strip.replaceChildren(...entry.images.map((image, i) => {
    const img = document.createElement("img");
    const query = new URLSearchParams({ filename: image.filename, subfolder: image.subfolder, type: image.type });
    img.src = api.apiURL(image.url ?? `/view?${query}`);
    img.title = entry.prompts?.[i] ?? "";
    img.className = "whetstone-preview-image";
    Object.assign(img.style, { height: "150px", objectFit: "contain", borderRadius: "3px" });
    return img;
  }));
}

function onPreview(event) {
  const detail = event.detail || {};
  const node = app.graph?.getNodeById?.(detail.node);
  const previews = node?.whetstonePreviews;
  if (!previews || !Array.isArray(detail.images)) return;
  if (previews.run !== detail.run) resetPreviews(previews, detail.run);
  previews.steps.push({ step: detail.step, prompts: detail.prompts, images: detail.images });
  showNewPreviews(node);
}

function showNewPreviews(node) {
  const previews = node.whetstonePreviews;
  while (previews.steps.length > MAX_PREVIEW_STEPS) previews.steps.shift();
  previews.box.style.display = "block";
  previews.slider.max = String(previews.steps.length - 1);
  if (previews.follow) previews.slider.value = previews.slider.max;
  showPreviewStep(previews, Number(previews.slider.value));
  fitNodeToContent(node);
}

function trainNodes() {
  return (app.graph?._nodes ?? []).filter((node) => node.type === TRAIN_NODE);
}

app.registerExtension({
  name: "whetstone.TrainingUI",

  async setup() {
    api.addEventListener("whetstone.progress", onProgress);
    api.addEventListener("whetstone.preview", onPreview);
    api.addEventListener("reconnected", () => trainNodes().forEach(loadHistory));
  },

  loadedGraphNode(node) {
    if (node.type === TRAIN_NODE) loadHistory(node);
  },

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!TEXT_NODES.has(nodeData.name) && !PREVIEW_NODES.has(nodeData.name)) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      if (nodeData.name === TRAIN_NODE) addChartPanel(this);
      if (PREVIEW_NODES.has(nodeData.name)) addPreviewPanel(this);
      if (TEXT_NODES.has(nodeData.name)) addTextPanel(this, !TABLE_NODES.has(nodeData.name));
      return result;
    };
    const onRemoved = nodeType.prototype.onRemoved;
    nodeType.prototype.onRemoved = function () {
      stopFollowing(this);
      return onRemoved?.apply(this, arguments);
    };
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      const result = onExecuted?.apply(this, arguments);
      if (this.whetstoneChart) {
        const job = message?.whetstone_background?.[0];
        if (job) followBackground(this, job);
        else stopFollowing(this);
      }
      const text = message?.text;
      if (this.whetstoneText && text != null) {
        this.whetstoneText.textContent = Array.isArray(text) ? text.join("\n") : String(text);
        fitNodeToContent(this);
      }
      return result;
    };
  },
});
