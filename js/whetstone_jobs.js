// Whetstone's jobs panel: a sidebar tab (app.extensionManager.registerSidebarTab, ComfyUI frontend >= 1.3) listing
// every job of the runs folder from GET /whetstone/jobs, with state, GPUs, step/ETA, loss sparkline, and the actions
// stop (save and stop), resume, open the report, load the LoRA (or a full fine-tune's model) into the graph.
// Everything from the server is shown with textContent (never as HTML): a run's name and message come from a folder
// on disk.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { previewStrip } from "./whetstone_job_previews.js";

const POLL_MS = 2000;
const STATE_COLOURS = {
  queued: "#a1a1aa", starting: "#60a5fa", running: "#22c55e", stopping: "#f59e0b",
  stopped: "#eab308", completed: "#10b981", failed: "#ef4444",
};
const ACTIVE = new Set(["queued", "starting", "running"]);
const RESUMABLE = new Set(["stopped", "failed"]);
// The node a run's file is loaded with: its LoRA, or a full fine-tune's model, and the EMA of either when the run
// kept one. All are ComfyUI's core loaders (UNETLoader is Load Diffusion Model), so the workflow built from them
// needs no Whetstone node.
const LOADERS = [
  { field: "lora_name", label: "Load LoRA", type: "LoraLoaderModelOnly", widget: "lora_name" },
  { field: "ema_lora_name", label: "Load EMA LoRA", type: "LoraLoaderModelOnly", widget: "lora_name" },
  { field: "model_name", label: "Load Model", type: "UNETLoader", widget: "unet_name" },
  { field: "ema_model_name", label: "Load EMA Model", type: "UNETLoader", widget: "unet_name" },
];

function formatDuration(seconds) {
  if (seconds == null || !isFinite(seconds)) return "–";
  const s = Math.max(0, Math.round(seconds));
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  return h > 0 ? `${h}h${String(m).padStart(2, "0")}m` : `${m}m${String(s % 60).padStart(2, "0")}s`;
}

function element(tag, style = {}, text = null) {
  const node = document.createElement(tag);
  Object.assign(node.style, style);
  if (text != null) node.textContent = text;
  return node;
}

// The loss as a small SVG polyline (log scale: a loss falls over decades).
function sparkline(values) {
  const width = 220, height = 36;
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("width", String(width));
  svg.setAttribute("height", String(height));
  svg.classList.add("whetstone-sparkline");
  const finite = (values || []).filter((v) => typeof v === "number" && isFinite(v) && v > 0).map(Math.log10);
  if (finite.length < 2) return svg;
  const lo = Math.min(...finite), hi = Math.max(...finite, lo + 1e-6);
  const points = finite.map((v, i) => {
    const x = (i / (finite.length - 1)) * (width - 2) + 1;
    const y = height - 2 - ((v - lo) / (hi - lo)) * (height - 4);
    return `${x.toFixed(1)},${y.toFixed(1)}`;
  });
  const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
  line.setAttribute("points", points.join(" "));
  line.setAttribute("fill", "none");
  line.setAttribute("stroke", "#fb923c");
  line.setAttribute("stroke-width", "1.5");
  svg.append(line);
  return svg;
}

function button(label, onClick) {
  const b = element("button", {
    fontSize: "11px", padding: "2px 8px", marginRight: "4px", cursor: "pointer", borderRadius: "4px",
    border: "1px solid var(--border-color, #555)", background: "var(--comfy-input-bg, #222)",
    color: "var(--input-text, #ddd)",
  }, label);
  b.addEventListener("click", onClick);
  return b;
}

async function post(action, run, panel) {
  try {
    const response = await api.fetchApi(`/whetstone/jobs/${action}`, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ run }),
    });
    const body = await response.json();
    if (!response.ok) panel.say(body.error || `${action} failed (${response.status})`);
  } catch (error) {
    panel.say(`${action} failed: ${error}`);
  }
  panel.refresh();
}

// A loader node in the middle of the visible canvas, its file widget set to the run's LoRA or model. A file saved
// after the page loaded is in no combo list yet: the lists are then refreshed (as the R key does) to offer it.
async function addLoader({ type, widget: widgetName }, name, panel) {
  const node = globalThis.LiteGraph?.createNode?.(type);
  if (!node) {
    panel.say(`could not create a ${type} node`);
    return;
  }
  const widget = node.widgets?.find((w) => w.name === widgetName);
  if (widget) widget.value = name;
  const ds = app.canvas?.ds;
  if (ds) {
    const rect = app.canvas.canvas.getBoundingClientRect();
    node.pos = [rect.width / 2 / ds.scale - ds.offset[0], rect.height / 2 / ds.scale - ds.offset[1]];
  }
  app.graph.add(node);
  app.graph.setDirtyCanvas?.(true, true);
  const listed = widget?.options?.values;
  if (!Array.isArray(listed) || !listed.includes(name)) {
    try {
      await app.refreshComboInNodes();
    } catch (error) {
      return panel.say(`added ${type} with ${name}; refreshing its list failed (press R): ${error}`);
    }
  }
  panel.say(`added ${type} with ${name}`);
}

function jobCard(job, panel) {
  const card = element("div", {
    border: "1px solid var(--border-color, #444)", borderRadius: "6px", padding: "6px 8px", marginBottom: "6px",
    background: "var(--comfy-menu-bg, #1c1c1c)",
  });
  card.className = "whetstone-job";
  card.dataset.run = job.run;
  card.dataset.state = job.state;
  const head = element("div", { display: "flex", justifyContent: "space-between", alignItems: "center" });
  head.append(element("b", { fontSize: "12px" }, job.run));
  head.append(element("span", {
    fontSize: "11px", padding: "1px 6px", borderRadius: "8px", color: "#111",
    background: STATE_COLOURS[job.state] || "#888",
  }, job.state));
  card.append(head);
  const gpus = job.gpus?.length ? `GPUs ${job.gpus.join(",")}` : job.gpu_count ? `${job.gpu_count} GPU(s)` : "CPU";
  const facts = [gpus];
  if (job.step != null) facts.push(`step ${job.step}/${job.total_steps ?? "?"}`);
  if (job.loss != null) facts.push(`loss ${Number(job.loss).toFixed(4)}`);
  if (job.eta_s != null) facts.push(`ETA ${formatDuration(job.eta_s)}`);
  card.append(element("div", { fontSize: "11px", fontFamily: "monospace", margin: "3px 0" }, facts.join(" · ")));
  if (job.sparkline?.length) card.append(sparkline(job.sparkline));
  if (job.previews && typeof job.previews === "object") card.append(previewStrip(job.previews));
  // A running job's status message is where it started ("step 0 of N"): the facts line has its step.
  if (job.message && !ACTIVE.has(job.state)) card.append(element("div", { fontSize: "10px", opacity: "0.75", overflowWrap: "anywhere" }, job.message));
  const actions = element("div", { marginTop: "4px" });
  if (ACTIVE.has(job.state)) actions.append(button("Stop", () => post("stop", job.run, panel)));
  if (RESUMABLE.has(job.state)) actions.append(button("Resume", () => post("resume", job.run, panel)));
  if (job.has_report) {
    actions.append(button("Report", () => {
      window.open(api.apiURL(`/whetstone/jobs/report?run=${encodeURIComponent(job.run)}`), "_blank", "noopener");
    }));
  }
  for (const loader of LOADERS) {
    const name = job[loader.field];
    if (name) actions.append(button(loader.label, () => addLoader(loader, name, panel)));
  }
  card.append(actions);
  return card;
}

class JobsPanel {
  constructor(root) {
    this.root = root;
    Object.assign(root.style, { padding: "8px", overflowY: "auto", height: "100%", color: "var(--input-text, #ddd)" });
    this.title = element("div", { fontWeight: "bold", marginBottom: "6px" }, "Whetstone jobs");
    this.note = element("div", { fontSize: "11px", minHeight: "14px", marginBottom: "4px", opacity: "0.8" });
    this.list = element("div");
    this.list.className = "whetstone-jobs";
    root.append(this.title, this.note, this.list);
    this.refresh();
    this.timer = setInterval(() => this.refresh(), POLL_MS);
  }

  say(text) {
    this.note.textContent = text;
  }

  async refresh() {
    let body;
    try {
      const response = await api.fetchApi("/whetstone/jobs");
      body = await response.json();
      if (!response.ok) return this.say(body.error || `could not list the jobs (${response.status})`);
    } catch (error) {
      return this.say(`could not list the jobs: ${error}`);
    }
    const cards = (body.jobs || []).map((job) => jobCard(job, this));
    if (!cards.length) cards.push(element("div", { fontSize: "11px", opacity: "0.7" }, `no runs in ${body.root}`));
    this.list.replaceChildren(...cards);
  }

  destroy() {
    clearInterval(this.timer);
  }
}

app.registerExtension({
  name: "whetstone.JobsPanel",

  async setup() {
    const manager = app.extensionManager;
    if (!manager?.registerSidebarTab) {
      console.warn("whetstone: this ComfyUI frontend has no sidebar tabs; the jobs panel is not shown");
      return;
    }
    let panel = null;
    manager.registerSidebarTab({
      id: "whetstone-jobs",
      icon: "pi pi-list-check",
      title: "Jobs",
      tooltip: "Whetstone training jobs",
      type: "custom",
      render: (root) => {
        panel?.destroy();
        panel = new JobsPanel(root);
      },
      destroy: () => {
        panel?.destroy();
        panel = null;
      },
    });
  },
});
