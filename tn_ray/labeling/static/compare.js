"use strict";
// A prompt and two blinded sets; alignment and quality each set1 / tie / set2, saved on the server at once.
let current = null;
const form = document.getElementById("form");

function choices() {
  const get = n => (form.querySelector('input[name="' + n + '"]:checked') || {}).value;
  return {alignment: get("alignment"), quality: get("quality")};
}

function update() {
  const c = choices();
  document.getElementById("submit").disabled = !(c.alignment && c.quality);
}

function render(s) {
  current = s;
  const finished = TN.frame(s, n => "All done: you answered " + n + " questions. Thank you! (back goes back to change an answer.)",
                            "Nothing is left for you: every question already has its annotators.");
  document.getElementById("submit").hidden = finished;
  document.getElementById("where").textContent = finished ? "" : "your question no. " + (s.pos + 1);
  if (finished) return;
  ["set1", "set2"].forEach((id, i) => document.getElementById(id).replaceChildren(...s.item.sets[i].map(TN.img)));
  form.reset();
  if (s.answer) for (const [k, v] of Object.entries(s.answer)) form.querySelector('input[name="' + k + '"][value="' + v + '"]').checked = true;
  update();
}

const step = TN.stepper(render, "Try again.");
form.addEventListener("change", update);
form.addEventListener("submit", e => {
  e.preventDefault();
  const comparison = choices();
  if (comparison.alignment && comparison.quality)
    step(() => TN.api("/api/answer", {method: "POST", body: JSON.stringify({pos: current.pos, comparison})}));
});
document.getElementById("back").addEventListener("click", () => step(() => TN.api("/api/state?pos=" + Math.max(current.pos - 1, 0))));
TN.begin(step);
