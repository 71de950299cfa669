"use strict";
// A prompt and two blinded sets; alignment and quality each set1 / tie / set2, saved on the server at once.
let current = null, busy = false;
const form = document.getElementById("form");

function choices() {
  const get = n => (form.querySelector('input[name="' + n + '"]:checked') || {}).value;
  return {alignment: get("alignment"), quality: get("quality")};
}

function render(s) {
  current = s;
  document.body.dataset.pos = s.pos;
  const p = s.progress;
  document.getElementById("progress-text").textContent = p.done + " / " + p.total + " done";
  Object.assign(document.getElementById("progress"), {value: p.done, max: Math.max(p.total, 1)});
  document.getElementById("main").hidden = s.finished && s.length === 0;
  document.getElementById("item").hidden = s.finished;
  document.getElementById("submit").hidden = s.finished;
  document.getElementById("back").disabled = s.pos === 0;
  if (s.finished) {
    TN.show("msg", p.done ? "All done: you answered " + p.done + " questions. Thank you! (back goes back to change an answer.)"
                          : "Nothing is left for you: every question already has its annotators.");
    document.getElementById("where").textContent = "";
    return;
  }
  TN.show("msg", "");
  document.getElementById("prompt").textContent = s.item.prompt;
  ["set1", "set2"].forEach((id, i) => document.getElementById(id).replaceChildren(...s.item.sets[i].map(TN.img)));
  form.reset();
  window.scrollTo(0, 0);
  if (s.answer) for (const [k, v] of Object.entries(s.answer)) form.querySelector('input[name="' + k + '"][value="' + v + '"]').checked = true;
  document.getElementById("where").textContent = "your question no. " + (s.pos + 1);
  update();
}

function update() {
  const c = choices();
  document.getElementById("submit").disabled = !(c.alignment && c.quality);
}

async function step(promise) {
  if (busy) return;
  busy = true; document.body.dataset.state = "busy";
  try { render(await promise()); }
  catch (err) { TN.show("msg", "Not saved: " + err.message + ". Try again.", true); }
  finally { busy = false; document.body.dataset.state = "ready"; }
}

form.addEventListener("change", update);
form.addEventListener("submit", e => {
  e.preventDefault();
  const comparison = choices();
  if (comparison.alignment && comparison.quality)
    step(() => TN.api("/api/answer", {method: "POST", body: JSON.stringify({pos: current.pos, comparison})}));
});
document.getElementById("back").addEventListener("click", () => step(() => TN.api("/api/state?pos=" + Math.max(current.pos - 1, 0))));

(async () => {
  const name = TN.name();
  document.getElementById("who").textContent = name;
  try { await TN.session(name); } catch (err) { TN.show("msg", err.message, true); document.body.dataset.state = "error"; return; }
  await step(() => TN.api("/api/state"));
})();
