// The chat page: pick a persona and stage, stream answers from /v1/chat/completions (SSE), hide or show [Analysis].
"use strict";
(function () {
  const P = window.persllm;
  const $ = id => document.getElementById(id);
  let personas = [], history = [], controller = null;

  function currentPersona() { return personas.find(p => p.name === $("model").value); }

  function fillStages() {
    const p = currentPersona(), sel = $("stage");
    sel.innerHTML = "";
    const none = new Option(p && p.default_stage ? "model default (" + p.default_stage + ")" : "model default", "");
    sel.add(none);
    for (const s of (p ? p.stages : [])) sel.add(new Option(s.id, s.id));
    sel.disabled = !p || p.stages.length === 0;
  }

  async function load() {
    try {
      const data = await P.api("/web/api/personas");
      personas = data.personas;
      const sel = $("model"), keep = sel.value;
      sel.innerHTML = "";
      for (const p of personas) sel.add(new Option(p.name, p.name));
      if (keep && personas.some(p => p.name === keep)) sel.value = keep;
      fillStages();
      P.setStatus(personas.length + " model(s) served");
    } catch (e) {
      P.setStatus(e.status === 401 ? "Enter the API key." : "Could not load the models: " + e.message, e.status !== 401);
    }
  }

  function render(el) {
    const text = el.dataset.raw || "";
    const [analysis, response] = P.splitThoughts(text);
    const show = $("thoughts").checked;
    const body = el.querySelector(".body"), thought = el.querySelector(".analysis");
    thought.hidden = !(show && analysis);
    thought.textContent = analysis ? "[Analysis] " + analysis : "";
    const tagged = /^\s*\[\s*analysis\s*\]/i.test(text) || /\[\s*response\s*\]/i.test(text);
    if (show && !tagged) body.textContent = text;
    else if (tagged && !/\[\s*response\s*\]/i.test(text)) body.textContent = el.dataset.done ? "" : "…";
    else body.textContent = response;
  }

  function addMessage(role, text) {
    const el = document.createElement("div");
    el.className = "msg " + role;
    const who = document.createElement("div");
    who.className = "who";
    who.textContent = role === "user" ? "You" : ($("model").value || "assistant");
    const thought = document.createElement("div");
    thought.className = "analysis";
    thought.hidden = true;
    const body = document.createElement("div");
    body.className = "body";
    el.append(who, thought, body);
    el.dataset.raw = text;
    if (role === "user") body.textContent = text; else render(el);
    $("messages").append(el);
    el.scrollIntoView({block: "end"});
    return el;
  }

  function messages(user) {
    const p = currentPersona(), sid = $("stage").value;
    const st = p && sid ? p.stages.find(s => s.id === sid) : null;
    return (st ? [{role: "system", content: st.system}] : []).concat(history, [{role: "user", content: user}]);
  }

  async function send(text) {
    const msgs = messages(text);
    addMessage("user", text);
    const el = addMessage("assistant", "");
    el.dataset.chunks = "0";
    el.setAttribute("aria-busy", "true");  // screen readers announce the answer once, when complete
    $("send").disabled = true; $("stop").disabled = false;
    P.setStatus("Answering…");
    controller = new AbortController();
    let raw = "";
    try {
      const r = await fetch("/v1/chat/completions", {
        method: "POST", headers: P.headers(), signal: controller.signal,
        body: JSON.stringify({model: $("model").value, messages: msgs, stream: true,
                              temperature: Number($("temperature").value), max_tokens: Number($("max-tokens").value)})});
      if (!r.ok) {
        let msg = "HTTP " + r.status;
        try { msg = (await r.json()).error.message; } catch (e) { /* not JSON */ }
        if (r.status === 401) P.showKeyForm(true);
        throw new Error(msg);
      }
      const reader = r.body.getReader(), dec = new TextDecoder();
      let buf = "";
      for (;;) {
        const {value, done} = await reader.read();
        if (done) break;
        buf += dec.decode(value, {stream: true});
        let i;
        while ((i = buf.indexOf("\n\n")) >= 0) {
          const event = buf.slice(0, i); buf = buf.slice(i + 2);
          for (const line of event.split("\n")) {
            if (!line.startsWith("data: ")) continue;
            const data = line.slice(6);
            if (data === "[DONE]") continue;
            const obj = JSON.parse(data);
            if (obj.error) throw new Error(obj.error.message);
            const d = obj.choices && obj.choices[0] && obj.choices[0].delta.content;
            if (d) {
              raw += d;
              el.dataset.raw = raw;
              el.dataset.chunks = String(Number(el.dataset.chunks) + 1);
              render(el);
            }
          }
        }
      }
      history.push({role: "user", content: text}, {role: "assistant", content: raw});
      P.setStatus("");
    } catch (e) {
      if (e.name === "AbortError") {
        history.push({role: "user", content: text}, {role: "assistant", content: raw});
        P.setStatus("Stopped.");
      } else {
        el.classList.add("failed");
        P.setStatus("The answer failed: " + e.message, true);
      }
    } finally {
      el.dataset.done = "1";
      el.removeAttribute("aria-busy");
      render(el);
      controller = null;
      $("send").disabled = false; $("stop").disabled = true;
    }
  }

  function reset() {
    if (controller) controller.abort();
    history = [];
    $("messages").innerHTML = "";
    P.setStatus("Conversation reset.");
    $("message").focus();
  }

  $("chat-form").addEventListener("submit", ev => {
    ev.preventDefault();
    const text = $("message").value.trim();
    if (!text || controller) return;
    $("message").value = "";
    send(text);
  });
  $("message").addEventListener("keydown", ev => {
    if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("chat-form").requestSubmit(); }
  });
  $("stop").addEventListener("click", () => controller && controller.abort());
  $("reset").addEventListener("click", reset);
  $("model").addEventListener("change", () => { fillStages(); reset(); });
  $("thoughts").addEventListener("change", () => document.querySelectorAll(".msg.assistant").forEach(render));
  P.ready(load);
})();
