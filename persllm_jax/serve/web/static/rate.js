// The rate page: fetch an item (a prompt and two anonymous answers), record the rater's A / B / tie choices.
"use strict";
(function () {
  const P = window.persllm;
  const $ = id => document.getElementById(id);
  const RATER = "persllm.raterId";
  const LABELS = {fidelity: "Persona fidelity: which answer sounds more like the persona?",
                  knowledge: "Knowledge: which answer is more accurate for the persona and time?",
                  style: "Style: which answer better matches the persona's way of speaking?"};
  let item = null, judgementId = null, criteria = ["fidelity", "knowledge", "style"], busy = false;

  function rater() {
    let r = localStorage.getItem(RATER);
    if (!r) { r = P.randomId("rater-").slice(0, 18); localStorage.setItem(RATER, r); }
    return r;
  }

  function buildCriteria() {
    const box = $("criteria");
    box.innerHTML = "";
    for (const c of criteria) {
      const fs = document.createElement("fieldset");
      const lg = document.createElement("legend");
      lg.textContent = LABELS[c] || c;
      fs.append(lg);
      for (const [v, text] of [["A", "A"], ["B", "B"], ["tie", "Tie"]]) {
        const id = "c-" + c + "-" + v;
        const input = document.createElement("input");
        Object.assign(input, {type: "radio", name: c, value: v, id: id, required: true});
        const label = document.createElement("label");
        label.htmlFor = id; label.textContent = text;
        const wrap = document.createElement("span");
        wrap.className = "choice";
        wrap.append(input, label);
        fs.append(wrap);
      }
      box.append(fs);
    }
  }

  async function next() {
    busy = true;
    $("item").hidden = true;
    P.setStatus("Loading an item…");
    try {
      item = await P.api("/web/api/rate/next", {rater_id: rater()});
      judgementId = P.randomId("j-");  // kept for retries of this submission: the server stores it once
      $("context").textContent = item.context || "(none)";
      $("context-box").hidden = !item.context;
      const h = $("history");
      h.innerHTML = "";
      for (const m of item.history) {
        const p = document.createElement("p");
        p.className = "turn";
        p.textContent = (m.role === "user" ? "User: " : "Persona: ") + m.content;
        h.append(p);
      }
      $("question").textContent = item.question;
      $("answer-a").textContent = item.answer_a || "(empty answer)";
      $("answer-b").textContent = item.answer_b || "(empty answer)";
      $("judged").textContent = String(item.judged_by_you);
      $("item").reset();
      $("item").dataset.assignment = item.assignment_id;
      $("item").hidden = false;
      P.setStatus("");
    } catch (e) {
      P.setStatus(e.status === 401 ? "Enter the API key." : "Could not load an item: " + e.message, e.status !== 401);
    } finally {
      busy = false;
    }
  }

  async function submit() {
    const choices = {};
    for (const c of criteria) {
      const v = document.querySelector("input[name=" + c + "]:checked");
      if (!v) { P.setStatus("Choose A, B or tie for every criterion.", true); return; }
      choices[c] = v.value;
    }
    const body = {judgement_id: judgementId, assignment_id: item.assignment_id, rater_id: rater(),
                  choices: choices, comment: $("comment").value};
    busy = true;
    $("submit").disabled = true;
    P.setStatus("Saving…");
    try {
      for (let attempt = 0; ; attempt++) {
        try {
          await P.api("/web/api/rate/judgement", body);
          break;
        } catch (e) {
          if (e.status || attempt >= 2) throw e;  // network errors: retry with the same judgement id
          await new Promise(r => setTimeout(r, 500 * (attempt + 1)));
        }
      }
      P.setStatus("Saved.");
      busy = false;
      await next();
    } catch (e) {
      P.setStatus("Not saved: " + e.message, true);
    } finally {
      busy = false;
      $("submit").disabled = false;
    }
  }

  $("rater").value = rater();
  $("rater").addEventListener("change", () => {
    const v = $("rater").value.trim();
    if ($("rater").checkValidity() && v) { localStorage.setItem(RATER, v); next(); }
    else P.setStatus("A rater id is 1-64 letters, digits or _ . : @ -", true);
  });
  $("item").addEventListener("submit", ev => { ev.preventDefault(); if (!busy) submit(); });
  $("skip").addEventListener("click", () => { if (!busy) next(); });
  buildCriteria();
  P.ready(next);
})();
