"use strict";
// Shared helpers: the annotator's session (name from the URL, secret in this browser's storage) and the API.
const TN = {
  key: name => "tn_ray_label:" + name,
  name: () => new URLSearchParams(location.search).get("annotator") || "",
  async session(name) {
    const secret = localStorage.getItem(TN.key(name));
    const r = await fetch("/api/session", {method: "POST", headers: {"Content-Type": "application/json"},
                                           body: JSON.stringify({name, secret})});
    const body = await r.json();
    if (!r.ok) throw new Error(body.detail || r.statusText);
    localStorage.setItem(TN.key(name), body.secret);
    return body.secret;
  },
  async api(path, options = {}) {
    const name = TN.name();
    const headers = Object.assign({"X-Annotator": name, "X-Session": localStorage.getItem(TN.key(name)) || ""},
                                  options.body ? {"Content-Type": "application/json"} : {});
    const r = await fetch(path, Object.assign({}, options, {headers}));
    const body = await r.json();
    if (!r.ok) throw new Error(typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail));
    return body;
  },
  show(id, text, error) {
    const el = document.getElementById(id);
    el.textContent = text; el.hidden = !text; el.classList.toggle("error", !!error);
  },
  img(src) { const i = document.createElement("img"); i.src = src; i.alt = ""; return i; },
  // The frame both task pages share: position, progress, item vs. finished, back button; true when finished.
  frame(s, doneText, emptyText) {
    document.body.dataset.pos = s.pos;
    const p = s.progress;
    document.getElementById("progress-text").textContent = p.done + " / " + p.total + " done";
    Object.assign(document.getElementById("progress"), {value: p.done, max: Math.max(p.total, 1)});
    document.getElementById("main").hidden = s.finished && s.length === 0;
    document.getElementById("item").hidden = s.finished;
    document.getElementById("back").disabled = s.pos === 0;
    TN.show("msg", !s.finished ? "" : p.done ? doneText(p.done) : emptyText);
    if (!s.finished) { document.getElementById("prompt").textContent = s.item.prompt; window.scrollTo(0, 0); }
    return s.finished;
  },
  // One request at a time; its answer is rendered, a failure shown (nothing is lost: nothing was saved).
  stepper(render, retry) {
    let busy = false;
    return async request => {
      if (busy) return;
      busy = true; document.body.dataset.state = "busy";
      try { render(await request()); }
      catch (err) { TN.show("msg", "Not saved: " + err.message + ". " + retry, true); }
      finally { busy = false; document.body.dataset.state = "ready"; }
    };
  },
  // Claim this page's annotator name (or resume it), then load their current item.
  async begin(step) {
    const name = TN.name();
    document.getElementById("who").textContent = name;
    try { await TN.session(name); }
    catch (err) { TN.show("msg", err.message, true); document.body.dataset.state = "error"; return; }
    await step(() => TN.api("/api/state"));
  },
};
