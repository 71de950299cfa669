"use strict";
// One image at a time; keys 1/2/3 answer (saved on the server at once), arrows move in this annotator's own queue.
let current = null;
const KEYS = {"1": "good", "2": "bad", "3": "skip"};

function render(s) {
  current = s;
  const finished = TN.frame(s, n => "All done: you labelled " + n + " images. Thank you! (\u2190 goes back to relabel.)",
                            "Nothing is left for you: every image already has its annotators.");
  if (!finished) document.getElementById("image").replaceChildren(TN.img(s.item.sets[0][0]));
  document.querySelectorAll("button[data-label]").forEach(b => {
    b.classList.toggle("chosen", b.dataset.label === s.answer); b.disabled = finished; });
  document.getElementById("forward").disabled = finished;
  document.getElementById("where").textContent = finished ? "" : "your image no. " + (s.pos + 1);
}

const step = TN.stepper(render, "Press the key again.");
const answer = label => step(() => TN.api("/api/answer", {method: "POST", body: JSON.stringify({pos: current.pos, label})}));
const go = pos => step(() => TN.api("/api/state?pos=" + Math.max(pos, 0)));

document.addEventListener("keydown", e => {
  if (!current || e.ctrlKey || e.metaKey || e.altKey) return;
  if (KEYS[e.key] && !current.finished) answer(KEYS[e.key]);
  else if (e.key === "ArrowLeft" && current.pos > 0) go(current.pos - 1);
  else if (e.key === "ArrowRight" && !current.finished) go(current.pos + 1);
});
document.querySelectorAll("button[data-label]").forEach(b => b.addEventListener("click", () => answer(b.dataset.label)));
document.getElementById("back").addEventListener("click", () => go(current.pos - 1));
document.getElementById("forward").addEventListener("click", () => go(current.pos + 1));
TN.begin(step);
