"use strict";
// One image at a time; keys 1/2/3 answer (saved on the server at once), arrows move in this annotator's own queue.
let current = null, busy = false;
const KEYS = {"1": "good", "2": "bad", "3": "skip"};

function render(s) {
  current = s;
  document.body.dataset.pos = s.pos;
  const p = s.progress;
  document.getElementById("progress-text").textContent = p.done + " / " + p.total + " done";
  Object.assign(document.getElementById("progress"), {value: p.done, max: Math.max(p.total, 1)});
  document.getElementById("main").hidden = s.finished && s.length === 0;
  document.getElementById("item").hidden = s.finished;
  if (s.finished) {
    TN.show("msg", p.done ? "All done: you labelled " + p.done + " images. Thank you! (\u2190 goes back to relabel.)"
                          : "Nothing is left for you: every image already has its annotators.");
  } else {
    TN.show("msg", "");
    document.getElementById("prompt").textContent = s.item.prompt;
    document.getElementById("image").replaceChildren(TN.img(s.item.sets[0][0]));
    window.scrollTo(0, 0);
  }
  document.querySelectorAll("button[data-label]").forEach(b => {
    b.classList.toggle("chosen", b.dataset.label === s.answer); b.disabled = s.finished; });
  document.getElementById("back").disabled = s.pos === 0;
  document.getElementById("forward").disabled = s.finished;
  document.getElementById("where").textContent = s.finished ? "" : "your image no. " + (s.pos + 1);
}

async function step(promise) {
  if (busy) return;
  busy = true; document.body.dataset.state = "busy";
  try { render(await promise()); }
  catch (err) { TN.show("msg", "Not saved: " + err.message + ". Press the key again.", true); }
  finally { busy = false; document.body.dataset.state = "ready"; }
}

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

(async () => {
  const name = TN.name();
  document.getElementById("who").textContent = name;
  try { await TN.session(name); } catch (err) { TN.show("msg", err.message, true); document.body.dataset.state = "error"; return; }
  await step(() => TN.api("/api/state"));
})();
