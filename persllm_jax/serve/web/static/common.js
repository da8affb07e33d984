// Shared by the chat and rate pages: the API key (session storage only), authorised fetch, small helpers.
"use strict";
(function () {
  const KEY = "persllm.apiKey";

  function apiKey() { return sessionStorage.getItem(KEY) || ""; }

  function headers(extra) {
    const h = Object.assign({"Content-Type": "application/json"}, extra || {});
    const k = apiKey();
    if (k) h["Authorization"] = "Bearer " + k;
    return h;
  }

  // fetch JSON; a 401 shows the key form and rejects with err.status = 401
  async function api(path, body) {
    const init = body === undefined ? {headers: headers()} : {method: "POST", headers: headers(), body: JSON.stringify(body)};
    const r = await fetch(path, init);
    let data = null;
    try { data = await r.json(); } catch (e) { data = null; }
    if (!r.ok) {
      if (r.status === 401) showKeyForm(true);
      const msg = (data && data.error && (data.error.message || data.error)) || ("HTTP " + r.status);
      const err = new Error(msg);
      err.status = r.status;
      throw err;
    }
    return data;
  }

  let onKey = null;
  function showKeyForm(needed) {
    const box = document.getElementById("key-box");
    if (!box) return;
    box.hidden = !needed;
    if (needed) {
      document.getElementById("key-note").textContent = apiKey() ? "The key was not accepted; enter it again." :
        "This server needs an API key.";
      document.getElementById("api-key").focus();
    }
  }

  function setupKeyForm(callback) {
    onKey = callback;
    const form = document.getElementById("key-form");
    if (!form) return;
    form.addEventListener("submit", function (ev) {
      ev.preventDefault();
      const v = document.getElementById("api-key").value.trim();
      if (v) sessionStorage.setItem(KEY, v); else sessionStorage.removeItem(KEY);
      document.getElementById("api-key").value = "";
      showKeyForm(false);
      if (onKey) onKey();
    });
  }

  function randomId(prefix) {
    const b = new Uint8Array(12);
    crypto.getRandomValues(b);  // available on plain http too (randomUUID is not)
    return (prefix || "") + Array.from(b, x => x.toString(16).padStart(2, "0")).join("");
  }

  // (analysis or null, response), as persllm_jax.talk.split_thoughts
  function splitThoughts(text) {
    const r = /\[\s*response\s*\]/i.exec(text);
    if (r) {
      const head = text.slice(0, r.index);
      const a = /\[\s*analysis\s*\]/i.exec(head);
      const analysis = (a ? head.slice(a.index + a[0].length) : head).trim();
      return [analysis || null, text.slice(r.index + r[0].length).trim()];
    }
    const t = text.replace(/^\s+/, "");
    const a = /^\[\s*analysis\s*\]/i.exec(t);
    if (a) return [t.slice(a[0].length).trim() || null, ""];
    return [null, text.trim()];
  }

  function setStatus(text, isError) {
    const s = document.getElementById("status");
    if (!s) return;
    s.textContent = text;
    s.classList.toggle("error", !!isError);
  }

  // resolves once a key is known (when the server needs one): the page then loads without a 401
  async function ready(callback) {
    setupKeyForm(callback);
    let info = {auth: false};
    try { info = await (await fetch("/web/api/info")).json(); } catch (e) { /* the API call will say */ }
    if (info.auth && !apiKey()) { showKeyForm(true); return; }
    callback();
  }

  window.persllm = {ready, api, headers, apiKey, showKeyForm, setupKeyForm, randomId, splitThoughts, setStatus};
})();
