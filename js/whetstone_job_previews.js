// A run's latest preview images for its card in the jobs panel (js/whetstone_jobs.js), from the job's `previews`
// (nodes/preview_jobs.py card): the server decodes them when the list asks, so a card shows "decoding…" until the
// next poll finds them decoded. Everything from the server is shown with textContent or as an <img> of our own route.
import { api } from "../../scripts/api.js";

const WAITING = { queued: "decoding…", decoding: "decoding…", busy: "waiting to be decoded…" };

export function previewStrip(previews) {
  const box = document.createElement("div");
  box.className = "whetstone-job-previews";
  Object.assign(box.style, { margin: "3px 0", fontSize: "10px", fontFamily: "monospace" });
  const label = document.createElement("div");
  const waiting = WAITING[previews.state];
  label.textContent = `previews at step ${previews.step}` + (waiting ? `: ${waiting}` : "");
  box.append(label);
  if (previews.state === "failed") {
    const reason = document.createElement("div");
    reason.textContent = previews.message || "not decoded";
    Object.assign(reason.style, { opacity: "0.75", overflowWrap: "anywhere" });
    box.append(reason);
  }
  const strip = document.createElement("div");
  Object.assign(strip.style, { display: "flex", gap: "3px", overflowX: "auto" });
  (previews.images || []).forEach((url, i) => {
    if (typeof url !== "string" || !url.startsWith("/whetstone/jobs/preview_image?")) return;
    const img = document.createElement("img");
    img.src = api.apiURL(url);
    img.title = previews.prompts?.[i] ?? "";
    img.className = "whetstone-job-preview";
    Object.assign(img.style, { height: "64px", objectFit: "contain", borderRadius: "3px" });
    strip.append(img);
  });
  box.append(strip);
  return box;
}
