// A run's latest preview images for its card in the jobs panel (js/whetstone_jobs.js), from the job's `previews`
// (nodes/preview_jobs.py card): the server decodes them when the list asks, so a card shows "decoding…" until the
// next poll finds them decoded. Everything from the server is shown with textContent or as an <img> of our own route,
// and checked first: a field missing or of another type (an older or newer server) shows less, never throws.
// decodedSteps reads GET /whetstone/jobs/previews for a background Train node's strip (js/whetstone.js).
import { api } from "../../scripts/api.js";

const WAITING = { queued: "decoding…", decoding: "decoding…", busy: "waiting to be decoded…" };
const STILL_DECODING = new Set(["queued", "decoding", "busy"]);
export const PREVIEW_IMAGE_ROUTE = "/whetstone/jobs/preview_image?";

const isStep = (value) => Number.isSafeInteger(value) && value >= 0;
const text = (value) => (typeof value === "string" ? value : "");

// The URLs of our own image route among `images` (anything else is left out).
function imageURLs(images) {
  if (!Array.isArray(images)) return [];
  return images.filter((url) => typeof url === "string" && url.startsWith(PREVIEW_IMAGE_ROUTE));
}

export function previewStrip(previews) {
  const box = document.createElement("div");
  box.className = "whetstone-job-previews";
  Object.assign(box.style, { margin: "3px 0", fontSize: "10px", fontFamily: "monospace" });
  const info = previews && typeof previews === "object" ? previews : {};
  const label = document.createElement("div");
  const waiting = WAITING[text(info.state)];
  label.textContent = `previews at step ${isStep(info.step) ? info.step : "?"}` + (waiting ? `: ${waiting}` : "");
  box.append(label);
  if (info.state === "failed") {
    const reason = document.createElement("div");
    reason.textContent = text(info.message) || "not decoded";
    Object.assign(reason.style, { opacity: "0.75", overflowWrap: "anywhere" });
    box.append(reason);
  }
  const strip = document.createElement("div");
  Object.assign(strip.style, { display: "flex", gap: "3px", overflowX: "auto" });
  const prompts = Array.isArray(info.prompts) ? info.prompts : [];
  imageURLs(info.images).forEach((url, i) => {
    const img = document.createElement("img");
    img.src = api.apiURL(url);
    img.title = text(prompts[i]);
    img.className = "whetstone-job-preview";
    Object.assign(img.style, { height: "64px", objectFit: "contain", borderRadius: "3px" });
    strip.append(img);
  });
  box.append(strip);
  return box;
}

// The decoded steps of a GET /whetstone/jobs/previews answer not in `known` (a Set of step numbers), as the node's
// strip keeps them ({step, prompts, images: [{url}]}), and whether some step is still being decoded. An answer that
// is not one (an error, an older server) adds nothing; an entry that is not a step is skipped.
export function decodedSteps(body, known) {
  const steps = Array.isArray(body?.steps) ? body.steps.filter((s) => s && typeof s === "object" && isStep(s.step)) : [];
  const added = steps
    .filter((s) => s.state === "decoded" && Array.isArray(s.images) && !known.has(s.step))
    .map((s) => ({
      step: s.step,
      prompts: Array.isArray(s.prompts) ? s.prompts.map(text) : [],
      images: imageURLs(s.images).map((url) => ({ url })),
    }));
  return { added, decoding: steps.some((s) => STILL_DECODING.has(s.state)) };
}
