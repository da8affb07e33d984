"""The web pages in a real headless Chromium (Debian's chromium + chromedriver, driven by Selenium) against a real
server on 127.0.0.1 with tiny persona models: the chat page streams an answer, the rate page records blind
judgements with the right model ids, both pages render (non-blank screenshots), fit a phone and log no console
errors."""

import io
import json
import shutil
import sqlite3
import tempfile
import time
from pathlib import Path

import numpy as np
import openai
import pytest

from talk_fixtures import STAGES, persona_models  # noqa: F401 (fixture)

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
KEY = "sk-web-test"
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage"]
PROMPTS = [{"id": "p-engine", "system": STAGES["late"], "prompt": "What is the Analytical Engine for?"},
           {"id": "p-poetry", "prompt": "Do you think poetry and science are related?"},
           {"id": "p-father", "messages": [{"role": "system", "content": STAGES["early"]},
                                           {"role": "user", "content": "Tell me about your father."}]}]
RATE_TOKENS = 12
COT = "[Analysis]: Engines weave algebraic patterns. [Response] It computes Bernoulli numbers!"

pytestmark = pytest.mark.skipif(not (Path(CHROMIUM).exists() and Path(DRIVER).exists()),
                                reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")


def make_cot_model(src, dst, text=COT):
    """A copy of the tiny model rewired to answer `text` to any chat: every layer's output projections are zero
    (each block is the identity), the chain's tokens get orthonormal embeddings and the untied output head maps
    each token of the chain to the next one, so the answer is the chain whatever the sampling."""
    from safetensors.numpy import load_file, save_file
    from transformers import AutoTokenizer

    src, dst = Path(src), Path(dst)
    shutil.copytree(src, dst)
    tok = AutoTokenizer.from_pretrained(str(dst))
    prompt = tok.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True, tokenize=False)
    last = tok.encode(prompt, add_special_tokens=False)[-1]
    chain = [last] + tok.encode(text, add_special_tokens=False) + [tok.convert_tokens_to_ids("<|im_end|>")]
    assert len(set(chain)) == len(chain), [tok.decode([t]) for t in chain]
    (f,) = dst.glob("*.safetensors")
    w = load_file(str(f))
    cfg = json.loads((dst / "config.json").read_text())
    emb = w["model.embed_tokens.weight"].copy()
    head = np.zeros_like(emb)
    assert len(chain) <= cfg["hidden_size"]
    for i, (t, nxt) in enumerate(zip(chain, chain[1:])):
        emb[t] = np.eye(cfg["hidden_size"], dtype=emb.dtype)[i]
        head[nxt] = 10 * emb[t]
    w["model.embed_tokens.weight"], w["lm_head.weight"] = emb, head
    for k in w:
        if k.endswith(("o_proj.weight", "down_proj.weight")):
            w[k] = np.zeros_like(w[k])
    save_file(w, str(f), metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": False}))
    return dst


@pytest.fixture(scope="module")
def site(persona_models, tmp_path_factory):
    from persllm_jax.serve.app import BackgroundServer, ServedModel, ServerState
    from persllm_jax.serve.personas import ModelPool, find_stage
    from persllm_jax.serve.web import RateConfig, web_routes

    tmp = tmp_path_factory.mktemp("web")
    pool = ModelPool(chunk=4)
    base = pool.base(str(persona_models["model"]))
    ada, ada_stages = pool.run(persona_models["ada"])
    darwin, darwin_stages = pool.run(persona_models["darwin"])
    models = {"ada": ServedModel("ada", ada, find_stage(ada_stages, "early").system),
              "darwin": ServedModel("darwin", darwin), "base": ServedModel("base", base),
              "cot": ServedModel("cot", pool.base(str(make_cot_model(persona_models["model"], tmp / "cot"))))}
    state = ServerState(models, api_key=KEY, chunk=4, default_max_tokens=24)
    prompts = tmp / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    db = tmp / "ratings.sqlite"
    routes = web_routes(state, {"ada": ada_stages, "darwin": darwin_stages},
                        RateConfig(str(prompts), str(db), ("ada", "darwin", "base"), max_tokens=RATE_TOKENS,
                                   temperature=0.0))  # greedy: the programs the chat test compiled
    with BackgroundServer(state, extra_routes=routes) as url:
        yield {"url": url, "db": db, "tmp": tmp,
               "client": openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)}


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="persllm-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for f in FLAGS + [f"--user-data-dir={profile}", "--window-size=1280,900"]:
        opts.add_argument(f)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait(driver, cond, timeout=90, what="condition"):
    t0 = time.time()
    while time.time() - t0 < timeout:
        v = cond(driver)
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}; status: {status(driver)!r}")


def status(driver):
    try:
        return driver.execute_script("return document.getElementById('status').textContent")
    except Exception:  # noqa: BLE001
        return None


def console_errors(driver) -> list:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def check_screenshot(driver, path: Path) -> dict:
    """Saves a screenshot and measures it: a blank (one-colour) page fails."""
    from PIL import Image

    png = driver.get_screenshot_as_png()
    path.write_bytes(png)
    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    colours = len(np.unique(img.reshape(-1, 3), axis=0))
    std = float(img.std())
    assert colours > 50 and std > 10, (path, colours, std)
    return {"colours": colours, "std": std, "size": img.shape[:2]}


def enter_key(driver):
    driver.find_element("id", "api-key").send_keys(KEY)
    driver.find_element("css selector", "#key-form button").click()


def open_page(driver, url):
    """Loads a page, entering the API key when this tab has none yet (so each test runs alone too)."""
    driver.get(url)
    if driver.execute_script("return sessionStorage.getItem('persllm.apiKey')") != KEY:
        wait(driver, lambda d: d.find_element("id", "key-box").is_displayed(), what="the API key form")
        enter_key(driver)


def accessibility_problems(driver) -> list:
    """Form controls without a label, fieldsets without a legend, buttons without text, a page without lang."""
    return driver.execute_script("""
      const bad = [];
      if (!document.documentElement.lang) bad.push('html has no lang');
      for (const el of document.querySelectorAll('input, select, textarea')) {
        if (el.type === 'hidden') continue;
        if (!(el.labels && el.labels.length) && !el.getAttribute('aria-label')) bad.push('no label: #' + el.id);
      }
      for (const fs of document.querySelectorAll('fieldset'))
        if (!fs.querySelector('legend')) bad.push('fieldset without legend');
      for (const b of document.querySelectorAll('button'))
        if (!b.textContent.trim() && !b.getAttribute('aria-label')) bad.push('button without text');
      return bad;""")


def test_chat_page_streams_an_answer(site, browser, tmp_path):
    d, url, client = browser, site["url"], site["client"]
    d.get(url + "/")
    wait(d, lambda d: d.find_element("id", "key-box").is_displayed(), what="the API key form")
    enter_key(d)
    wait(d, lambda d: len(d.find_elements("css selector", "#model option")) == 4, what="the model list")
    # the key stays in this tab's session storage, never in local storage
    assert d.execute_script("return sessionStorage.getItem('persllm.apiKey')") == KEY
    assert d.execute_script("return JSON.stringify(localStorage)").find(KEY) < 0
    from selenium.webdriver.support.ui import Select

    Select(d.find_element("id", "model")).select_by_value("ada")
    stages = [o.get_attribute("value") for o in d.find_elements("css selector", "#stage option")]
    assert stages == ["", "early", "late"]
    Select(d.find_element("id", "stage")).select_by_value("late")
    for field, value in (("temperature", "0"), ("max-tokens", "24")):
        el = d.find_element("id", field)
        el.clear()
        el.send_keys(value)
    question = "What did you think of Mr Babbage?"
    d.find_element("id", "message").send_keys(question)
    d.find_element("id", "send").click()
    done = wait(d, lambda d: d.find_elements("css selector", ".msg.assistant[data-done='1']"), what="the answer")
    msg = done[0]
    raw, chunks = msg.get_attribute("data-raw"), int(msg.get_attribute("data-chunks"))
    expected = client.chat.completions.create(
        model="ada", temperature=0, max_tokens=24,
        messages=[{"role": "system", "content": STAGES["late"]}, {"role": "user", "content": question}]
    ).choices[0].message.content
    assert raw == expected and raw.strip()
    assert chunks >= 3, chunks  # the page received and rendered the answer piece by piece (chunk=4 tokens)
    assert msg.find_element("css selector", ".body").text.strip() == expected.strip()
    assert "failed" not in msg.get_attribute("class")
    # a second turn carries the history; the answer equals the API's answer to the whole conversation
    d.find_element("id", "message").send_keys("And his engine?")
    d.find_element("id", "send").click()
    wait(d, lambda d: len(d.find_elements("css selector", ".msg.assistant[data-done='1']")) == 2, what="turn 2")
    second = d.find_elements("css selector", ".msg.assistant")[1].get_attribute("data-raw")
    expected2 = client.chat.completions.create(
        model="ada", temperature=0, max_tokens=24,
        messages=[{"role": "system", "content": STAGES["late"]}, {"role": "user", "content": question},
                  {"role": "assistant", "content": expected}, {"role": "user", "content": "And his engine?"}]
    ).choices[0].message.content
    assert second == expected2
    shot = check_screenshot(d, tmp_path / "chat.png")
    assert accessibility_problems(d) == []
    d.find_element("id", "reset").click()
    assert d.find_elements("css selector", ".msg") == []
    assert console_errors(d) == []
    print(f"chat page: answer in {chunks} streamed pieces; screenshot {shot}")


def test_analysis_toggle_matches_python_split(site, browser):
    """The page's [Analysis]/[Response] split is talk.split_thoughts; toggling shows and hides the analysis."""
    from persllm_jax.serve.personas import split_thoughts

    d = browser
    open_page(d, site["url"] + "/")
    wait(d, lambda d: len(d.find_elements("css selector", "#model option")) == 4, what="the model list")
    cases = ["[Analysis] I weigh it. [Response] Yes, indeed.", "no tags at all", "[analysis] only thinking",
             "  [ Analysis ]a[RESPONSE]b ", "[Response] direct", "text [Response] after"]
    for text in cases:
        got = d.execute_script("return window.persllm.splitThoughts(arguments[0])", text)
        assert tuple(got) == split_thoughts(text), text
    # a model that answers with a chain of thought: streamed with the analysis hidden, then toggled
    from selenium.webdriver.support.ui import Select

    Select(d.find_element("id", "model")).select_by_value("cot")
    d.execute_script("""
      window.seenTexts = [];
      new MutationObserver(() => document.querySelectorAll('.msg.assistant .body')
          .forEach(b => window.seenTexts.push(b.textContent)))
        .observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});""")
    d.find_element("id", "message").send_keys("Who are you?")
    d.find_element("id", "send").click()
    msg = wait(d, lambda d: d.find_elements("css selector", ".msg.assistant[data-done='1']"), what="the answer")[0]
    assert msg.get_attribute("data-raw") == COT and int(msg.get_attribute("data-chunks")) >= 3
    seen = d.execute_script("return window.seenTexts")
    assert seen and not any("Engines" in t for t in seen), seen  # the analysis never showed while streaming
    body = lambda: msg.find_element("css selector", ".body").text  # noqa: E731
    analysis = msg.find_element("css selector", ".analysis")
    assert body() == "It computes Bernoulli numbers!" and not analysis.is_displayed()
    d.find_element("id", "thoughts").click()
    assert analysis.is_displayed() and analysis.text == "[Analysis] : Engines weave algebraic patterns."
    assert body() == "It computes Bernoulli numbers!"
    d.find_element("id", "thoughts").click()
    assert not analysis.is_displayed()
    assert console_errors(d) == []


def _expected_answers(client, prompt_row):
    """Each model's answer to a prompt as the API gives it with the rate page's sampling (seeded per item)."""
    from persllm_jax.serve.personas import split_thoughts
    from persllm_jax.serve.web.rate import answer_seed, load_prompts

    out = {}
    for m in ("ada", "darwin", "base"):
        r = client.chat.completions.create(model=m, messages=[dict(x) for x in prompt_row.messages],
                                           temperature=0.0, top_p=0.9, max_tokens=RATE_TOKENS,
                                           seed=answer_seed(prompt_row.id, m))
        text = r.choices[0].message.content
        out[m] = split_thoughts(text)[1] or text.strip()
    return out


def test_rate_page_records_judgements_with_the_right_models(site, browser, tmp_path):
    from persllm_jax.serve.web.rate import load_prompts

    d, url, client = browser, site["url"], site["client"]
    prompts = {p.messages[-1]["content"]: p for p in load_prompts(site["tmp"] / "prompts.jsonl")}
    expected = {}
    open_page(d, url + "/rate")
    wait(d, lambda d: d.find_element("id", "item").is_displayed(), what="the first item")
    rater = d.find_element("id", "rater")
    assert rater.get_attribute("value").startswith("rater-")  # generated and kept in the browser
    rater.clear()
    rater.send_keys("alice\t")
    orders, seen, made = set(), None, []
    picks = [("A", "B", "tie"), ("B", "tie", "A"), ("tie", "A", "B")]
    for n in range(16):
        aid = wait(d, lambda d: (d.find_element("id", "item").is_displayed()
                                 and d.find_element("id", "item").get_attribute("data-assignment") != seen
                                 and d.find_element("id", "item").get_attribute("data-assignment")),
                   what="the next item")
        q = d.find_element("id", "question").text
        p = prompts[q]
        if p.id not in expected:
            expected[p.id] = _expected_answers(client, p)
            assert len(set(expected[p.id].values())) == 3, expected[p.id]  # answers tell the models apart
        a, b = d.find_element("id", "answer-a").text, d.find_element("id", "answer-b").text
        who = {v.strip(): k for k, v in expected[p.id].items()}
        model_a, model_b = who[a.strip()], who[b.strip()]
        fid, know, style = picks[n % 3]
        for crit, v in (("fidelity", fid), ("knowledge", know), ("style", style)):
            d.find_element("id", f"c-{crit}-{v}").click()
        d.find_element("id", "comment").send_keys(f"note {n}")
        d.find_element("id", "submit").click()
        made.append((aid, p.id, model_a, model_b, fid, know, style, f"note {n}"))
        orders.add(model_a < model_b)
        seen = aid
        if len(made) >= 3 and len(orders) == 2:
            break
    wait(d, lambda d: d.find_element("id", "item").get_attribute("data-assignment") != seen, what="the last save")
    assert len(orders) == 2, "the A/B order never varied"
    con = sqlite3.connect(site["db"])
    rows = {r[0]: r[1:] for r in con.execute(
        "SELECT assignment_id, prompt_id, model_a, model_b, fidelity, knowledge, style, comment, rater_id, order_shown "
        "FROM judgements WHERE rater_id='alice'")}
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.close()
    assert len(rows) == len(made)
    for aid, pid, ma, mb, fid, know, style, comment in made:
        assert rows[aid][:7] == (pid, ma, mb, fid, know, style, comment), (rows[aid], ma, mb)
        assert rows[aid][7:] == ("alice", f"{ma},{mb}")
    assert d.find_element("id", "judged").text == str(len(made))
    shot = check_screenshot(d, tmp_path / "rate.png")
    assert accessibility_problems(d) == []
    assert console_errors(d) == []
    print(f"rate page: {len(made)} judgements stored with the shown models; screenshot {shot}")


def test_pages_fit_a_phone_and_ship_their_assets(site, browser, tmp_path):
    import urllib.request

    d, url = browser, site["url"]
    d.set_window_size(390, 844)
    try:
        for path in ("/", "/rate"):
            open_page(d, url + path)
            ready = "#model option" if path == "/" else "#item:not([hidden])"
            wait(d, lambda d: d.find_elements("css selector", ready), what=f"{path} loaded")
            width = d.execute_script("return [document.documentElement.scrollWidth, window.innerWidth]")
            assert width[0] <= width[1], (path, width)  # no sideways scrolling on a phone
            if path == "/rate":
                a = d.find_element("id", "answer-a").rect
                b = d.find_element("id", "answer-b").rect
                assert b["y"] >= a["y"] + a["height"], (a, b)  # answers stacked, not squeezed side by side
            check_screenshot(d, tmp_path / f"phone{path.replace('/', '_')}.png")
            assert accessibility_problems(d) == []
        assert console_errors(d) == []
    finally:
        d.set_window_size(1280, 900)
    # every asset is served by us: no external URL in the pages, and the CSP forbids other origins
    from persllm_jax.serve.web import STATIC

    for f in STATIC.iterdir():
        text = f.read_text(encoding="utf-8")
        bare = text.replace('xmlns="http://www.w3.org/2000/svg"', "")  # a namespace name, not a fetch
        assert "http://" not in bare and "https://" not in bare, f.name
        with urllib.request.urlopen(url + "/static/" + f.name) as r:
            assert r.status == 200 and r.read().decode() == text
    with urllib.request.urlopen(url + "/") as r:
        assert "default-src 'self'" in r.headers["Content-Security-Policy"]
