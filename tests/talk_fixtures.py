"""Tiny persona models for the chat / serve / simulate tests: a random SmolLM2-shaped model with the real
SmolLM2 tokenizer and chat template, and training-run directories holding random LoRA adapters (the layout
the trainer writes: run.json + orbax checkpoints + the corpus it names)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

ROOT = Path(__file__).resolve().parents[1]


def make_model(path, seed: int = 0) -> Path:
    from persllm_jax.model.weights import load_tokenizer
    from tiny import save_tiny

    path = Path(path)
    save_tiny("smollm2", path, seed=seed, vocab_size=49152, hidden_size=32, intermediate_size=64,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    load_tokenizer("smollm2").save_pretrained(str(path))
    return path


STAGES = {"early": "You are Ada Lovelace. Now it's 1834.", "late": "You are Ada Lovelace. Now it's 1844."}


def write_corpus(root, persona: str = "ada_lovelace", stages: dict = STAGES) -> Path:
    root = Path(root)
    (root / "sft").mkdir(parents=True, exist_ok=True)
    with (root / "sft" / "train.jsonl").open("w") as f:
        for sid, system in stages.items():
            for i in range(2):
                msgs = [{"role": "system", "content": system}, {"role": "user", "content": f"question {i}?"},
                        {"role": "assistant", "content": f"[Analysis] thinking {i}. [Response] answer {i}."}]
                f.write(json.dumps({"id": f"{persona}/{sid}/{i}", "persona": persona, "stage": sid, "type": "ordinary",
                                    "messages": msgs}) + "\n")
    return root / "sft" / "train.jsonl"


def make_run(run_dir, model_dir, seed: int, corpus: Path | None = None, rank: int = 4, alpha: float = 8.0) -> Path:
    """A run directory with a random (non-zero) LoRA adapter, as `persllm train sft` leaves it."""
    from persllm_jax.train import checkpoint
    from persllm_jax.model import lora as lora_mod
    from persllm_jax.model.weights import load_model

    run_dir = Path(run_dir)
    loaded = load_model(str(model_dir))
    targets = lora_mod.resolve_targets(["q_proj", "v_proj", "o_proj", "down_proj"])
    lora = lora_mod.init_lora(loaded.cfg, jax.random.key(seed), rank, targets)
    k = jax.random.key(seed + 1000)
    lora = {n: {"a": v["a"], "b": 0.5 * jax.random.normal(jax.random.fold_in(k, i), v["b"].shape, v["b"].dtype)}
            for i, (n, v) in enumerate(sorted(lora.items()))}
    mgr = checkpoint.manager(run_dir)
    checkpoint.save(mgr, 1, lora, {"count": jnp.zeros((), jnp.int32)}, {"step": jnp.int32(1), "rng": jnp.zeros(2, jnp.uint32)},
                    {"step": 1, "data_position": 1, "kind": "lora"}, "lora")
    mgr.wait_until_finished()
    corpus = corpus or write_corpus(run_dir.parent / f"{run_dir.name}-corpus")
    (run_dir / "run.json").write_text(json.dumps({
        "model": str(model_dir), "model_source": loaded.source, "model_config": loaded.hf_config, "kind": "lora",
        "lora": {"rank": rank, "alpha": alpha, "dropout": 0.0, "targets": list(targets),
                 "scale": lora_mod.lora_scale(rank, alpha)},
        "data": str(corpus), "total_steps": 1}, indent=1, default=str))
    return run_dir


@pytest.fixture(scope="session")
def persona_models(tmp_path_factory):
    """One tiny model and two runs (random adapters) shared by the serve, chat and simulate tests."""
    root = tmp_path_factory.mktemp("personas")
    model = make_model(root / "model")
    return {"root": root, "model": model, "ada": make_run(root / "ada", model, seed=1),
            "darwin": make_run(root / "darwin", model, seed=2)}


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e.pop("XLA_FLAGS", None)  # one CPU device is enough for a server
    return e


class ServeProcess:
    """`persllm serve ...` in a subprocess on 127.0.0.1 with a free port; the URL once it listens."""

    def __init__(self, *args, timeout: float = 180):
        self.args, self.timeout = args, timeout
        self.lines: list[str] = []

    def __enter__(self) -> str:
        import threading

        cmd = [sys.executable, "-m", "persllm_jax", "serve", "--host", "127.0.0.1", "--port", "0", *self.args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env(),
                                     cwd=str(ROOT))
        found = threading.Event()
        self.url = None

        def pump():
            for line in self.proc.stdout:
                self.lines.append(line)
                if "listening on " in line and self.url is None:
                    self.url = line.split("listening on ", 1)[1].split()[0].removesuffix("/v1")
                    found.set()

        threading.Thread(target=pump, daemon=True).start()
        t0 = time.time()
        while not found.wait(0.2):
            if self.proc.poll() is not None or time.time() - t0 > self.timeout:
                self.proc.kill()
                raise RuntimeError("persllm serve did not start:\n" + "".join(self.lines))
        return self.url

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


