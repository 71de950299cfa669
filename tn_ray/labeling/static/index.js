"use strict";
(async () => {
  const info = await (await fetch("/api/info")).json();
  const label = info.kind === "label";
  document.getElementById("title").textContent = label ? "Image labelling" : "Side-by-side evaluation";
  document.getElementById("info").textContent = info.items + (label ? " images" : " questions") +
    ", each answered by " + info.per_item + " people";
  document.getElementById("what").textContent = label
    ? "You will see one image and its prompt at a time. Press 1 if the image matches the prompt (good), 2 if not (bad), 3 to skip."
    : "You will see a prompt and two sets of images. For text alignment and for image quality, choose the better set or a tie.";
  document.getElementById("start").addEventListener("submit", async e => {
    e.preventDefault();
    const name = document.getElementById("name").value.trim();
    try {
      await TN.session(name);
      location.href = "/task?annotator=" + encodeURIComponent(name);
    } catch (err) { TN.show("error", err.message, true); }
  });
})();
