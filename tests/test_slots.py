"""The continuous-batching engine (serve/continuous.py, serve/slots.py, serve/adapters.py) without HTTP: a row's
tokens do not depend on its batch mates, their adapters or when they joined; sampled rows follow their seed; a
PEFT adapter folder written by `peft` serves what transformers + peft generate."""

import threading

import pytest

from talk_fixtures import persona_models  # noqa: F401 (fixture)

Q = [{"role": "user", "content": "Tell me about the Analytical Engine."}]
PROMPTS = [[{"role": "user", "content": f"Question number {i}: what is {i} plus {i}?"}] for i in range(6)]


@pytest.fixture(scope="module")
def gens(persona_models):
    from persllm_jax.serve.personas import ModelPool

    pool = ModelPool(chunk=4)
    base = pool.base(str(persona_models["model"]))
    return {"base": base, "ada": pool.run(persona_models["ada"])[0], "darwin": pool.run(persona_models["darwin"])[0]}


class Runner:
    """Submit jobs to a ContinuousScheduler; `on_tokens(job_key, n, fn)` submits more once a job has n tokens."""

    def __init__(self, sched, gens):
        self.sched, self.gens = sched, gens
        self.done: dict = {}
        self.triggers: list = []
        self.lock = threading.Lock()
        self.finished = threading.Condition(self.lock)

    def submit(self, key, model, messages, sp):
        from persllm_jax.serve.scheduler import Job

        def post(kind, payload):
            with self.lock:
                fire = [t for t in self.triggers if t[0] == key and len(payload.token_ids) >= t[1]]
                self.triggers = [t for t in self.triggers if t not in fire]
            for t in fire:
                t[2]()
            if kind in ("done", "error"):
                with self.lock:
                    self.done[key] = (kind, payload)
                    self.finished.notify_all()

        self.sched.submit(Job(model, self.gens[model].encode_chat(messages), sp, post))

    def on_tokens(self, key, n, fn):
        self.triggers.append((key, n, fn))

    def wait(self, keys, timeout=300):
        with self.lock:
            assert self.finished.wait_for(lambda: all(k in self.done for k in keys), timeout), (keys, self.done)
        assert all(self.done[k][0] == "done" for k in keys), self.done
        return {k: self.done[k][1].token_ids for k in keys}


def _sched(gens, **kw):
    from persllm_jax.serve.continuous import ContinuousScheduler

    kw.setdefault("n_slots", 4)
    return ContinuousScheduler(gens, chunk=4, prefill_chunk=16, **kw)


def test_greedy_row_independent_of_batch_adapters_and_join_point(gens):
    """ada's answer alone == in a batch of ada rows == with base/darwin rows joining after 0, 4, 8 and 12 of its
    tokens (long prompts: 37 tokens, read in 16-token prefill chunks while it decodes); 4 slots for 10 jobs, so
    slots are reused over stale keys. All equal the static engine's answer (an independent implementation)."""
    from persllm_jax.serve.engine import SamplingParams

    sp = SamplingParams(max_new_tokens=16)
    static = {(m, i): gens[m].chat([p], sp)[0].token_ids for m in gens for i, p in enumerate(PROMPTS[:3])}
    target = gens["ada"].chat([Q], sp)[0].token_ids
    sched = _sched(gens)
    try:
        alone = Runner(sched, gens)
        alone.submit("t", "ada", Q, sp)
        assert alone.wait(["t"])["t"] == target

        own = Runner(sched, gens)
        for i in range(3):
            own.submit(("ada", i), "ada", PROMPTS[i], sp)
        own.submit("t", "ada", Q, sp)
        got = own.wait(["t"] + [("ada", i) for i in range(3)])
        assert got["t"] == target and all(got[("ada", i)] == static[("ada", i)] for i in range(3))

        mixed = Runner(sched, gens)
        joins = {0: ("base", 0), 4: ("darwin", 1), 8: ("base", 2), 12: ("darwin", 0)}
        mixed.submit("t", "ada", Q, sp)
        for n, (m, i) in joins.items():
            if n == 0:
                mixed.submit((m, i), m, PROMPTS[i], sp)
            else:
                mixed.on_tokens("t", n, lambda m=m, i=i: mixed.submit((m, i), m, PROMPTS[i], sp))
        # more rows than slots: these wait for a free slot and reuse it
        for i in range(2):
            mixed.on_tokens("t", 4, lambda i=i: mixed.submit(("ada", i), "ada", PROMPTS[i], sp))
        keys = ["t", *joins.values(), ("ada", 0), ("ada", 1)]
        got = mixed.wait(keys)
        assert got["t"] == target
        for k in keys[1:]:
            assert got[k] == static[k], k
        assert sched.stats["row_steps"] > sched.stats["decode_steps"]  # rows really decoded together
    finally:
        sched.close()


def test_sampled_rows_follow_their_seed(gens):
    from persllm_jax.serve.engine import SamplingParams

    sp = lambda seed: SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=seed)
    sched = _sched(gens)
    try:
        alone = Runner(sched, gens)
        alone.submit(5, "darwin", Q, sp(5))
        alone.submit(6, "darwin", Q, sp(6))
        ref = alone.wait([5, 6])
        assert ref[5] != ref[6]
        busy = Runner(sched, gens)
        busy.submit(("g", 0), "base", PROMPTS[0], SamplingParams(max_new_tokens=12))
        busy.on_tokens(("g", 0), 4, lambda: busy.submit(5, "darwin", Q, sp(5)))
        busy.submit(("s", 1), "ada", PROMPTS[1], sp(9))
        assert busy.wait([5, ("g", 0), ("s", 1)])[5] == ref[5]
    finally:
        sched.close()


def test_too_many_adapters_and_slot_limit(gens):
    from persllm_jax.serve.adapters import AdapterError
    from persllm_jax.serve.engine import SamplingParams
    from persllm_jax.serve.scheduler import Job

    with pytest.raises(AdapterError, match="at most 1"):
        _sched(gens, max_adapters=1)
    sched = _sched({"base": gens["base"]}, slot_tokens=64)
    try:
        eng = sched.engines[0]
        assert eng.slot_tokens == 64 and eng.kv_bytes_per_slot() == 2 * 2 * 2 * 64 * 8 * 4  # L, KV, S, hd, fp32
        with pytest.raises(ValueError, match="64 tokens"):
            sched.submit(Job("base", [1] * 60, SamplingParams(max_new_tokens=8), lambda *a: None))
    finally:
        sched.close()


def test_peft_adapter_folder_serves_what_transformers_peft_generate(gens, persona_models, tmp_path):
    """An adapter folder written by peft itself (random non-zero B, rsLoRA off, r=4, alpha=16) served over the
    base: the same greedy tokens as transformers + peft, alone and mixed with other adapters."""
    import peft
    import torch
    import transformers

    from persllm_jax.serve.engine import SamplingParams
    from persllm_jax.serve.personas import ModelPool

    model_dir = persona_models["model"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    cfg = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
                          init_lora_weights=False, lora_dropout=0.0)
    torch.manual_seed(0)
    model = peft.get_peft_model(hf, cfg)
    with torch.no_grad():  # init_lora_weights=False leaves B random but small; make the adapter matter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(20.0)
    model.save_pretrained(str(tmp_path / "peft_ada"))
    model.eval()
    assert (tmp_path / "peft_ada" / "adapter_model.safetensors").is_file()

    pool = ModelPool(chunk=4)
    pool.bases[str(model_dir)] = (gens["base"], None)  # the same base in memory
    peft_gen = pool.peft(tmp_path / "peft_ada", str(model_dir))
    ids = peft_gen.encode_chat(Q)
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, min_new_tokens=12,
                             attention_mask=torch.ones(1, len(ids), dtype=torch.long))[0, len(ids):].tolist()
    sp = SamplingParams(max_new_tokens=12)
    sched = _sched({**gens, "peft": peft_gen})
    try:
        r = Runner(sched, {**gens, "peft": peft_gen})
        r.submit("p", "peft", Q, sp)
        r.submit("a", "ada", Q, sp)
        r.submit("b", "base", Q, sp)
        got = r.wait(["p", "a", "b"])
    finally:
        sched.close()
    eos = set(peft_gen.eos_token_ids)
    assert not eos & set(ref), "the reference hit EOS; the comparison would be cut short"
    assert got["p"] == ref
    assert got["p"] != got["b"] and got["p"] != got["a"]
