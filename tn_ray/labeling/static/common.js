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
};
