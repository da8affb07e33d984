"""Multi-host on one machine: 2 processes on 127.0.0.1 (gloo CPU collectives), 4 emulated devices each, run 3 SFT
steps and then 3 DPO steps through `jax.distributed`; losses, metrics and the checkpointed LoRA params equal the
single-process run on 8 devices.

The SFT mesh (2, 2, 2) splits each batch between the processes (each loads and transfers only its rows); the
DPO mesh (1, 1, 8) puts the tensor axis across the processes, so both need every row (the case a
process-index row split gets wrong). Checkpoints are
written by both processes through orbax and read back here; metrics.jsonl is written by process 0 only.
"""

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from chat_fixtures import WORDS, tiny_model_dir, write_corpus

from persllm_jax.train import checkpoint, sft

pytestmark = pytest.mark.slow  # minutes of CPU: `bash tools/test.sh -m "not slow"` skips it

SFT_SETS = ["steps=3", "max_length=64", "batch_size=8", "learning_rate=1e-3", "warmup_steps=0", "log_every=1",
            "lora.rank=8", "lora.alpha=16", "lora.dropout=0.1", "shuffle=true", "seed=3", "peak_tflops=0.15",
            "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]
DPO_SETS = ["steps=3", "max_length=96", "batch_size=4", "learning_rate=1e-2", "warmup_steps=0", "log_every=1",
            "lora.rank=4", "lora.alpha=8", "beta=0.5", "shuffle=true", "seed=1", "peak_tflops=0.15",
            "mesh.data=1", "mesh.fsdp=1", "mesh.tensor=8"]

WORKER = r"""
import json, sys
from persllm_jax.train import sft
from persllm_jax.train import sharding as shd
from persllm_jax.train.config import load_config
model, corpus, out, port, pid, sft_sets, dpo_sets = sys.argv[1:8]
dist = ["distributed=true", f"coordinator_address=127.0.0.1:{port}", "num_processes=2", f"process_id={pid}"]
log = lambda s: print(f"[{pid}] {s}", flush=True)
base = {"model": model, "data": corpus}
cfg = load_config(overrides=json.loads(sft_sets) + dist, base=base)
res = sft.run(cfg, f"{out}/sft", progress=False, log=log)
import jax
log(f"processes={jax.process_count()} devices={jax.device_count()} local={jax.local_device_count()} "
    f"rows={shd.process_rows(shd.batch_sharding(res['mesh']), cfg.batch_size)}")
from persllm_jax.train import dpo
from persllm_jax.train.config import DPOConfig
dcfg = load_config(DPOConfig, overrides=json.loads(dpo_sets) + dist, base=base)
res = dpo.run(dcfg, f"{out}/dpo", progress=False, log=log)
log(f"dpo rows={shd.process_rows(shd.batch_sharding(res['mesh']), dcfg.batch_size)}")
log("done")
"""


def write_pairs(root: Path, n: int = 16, seed: int = 0) -> Path:
    """CORPUS/dpo/train.jsonl: chosen answers reverse the question, rejected ones repeat it."""
    rng = random.Random(seed)
    (root / "dpo").mkdir(parents=True, exist_ok=True)
    with (root / "dpo" / "train.jsonl").open("w") as f:
        for i in range(n):
            q = [rng.choice(WORDS[:-3]) for _ in range(rng.randint(3, 9))]
            row = {"id": f"p{i}", "prompt": [{"role": "user", "content": " ".join(q) + " ?"}],
                   "chosen": [{"role": "assistant", "content": " ".join(reversed(q)) + " ."}],
                   "rejected": [{"role": "assistant", "content": " ".join(q) + " ."}]}
            f.write(json.dumps(row) + "\n")
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(two-process run dir, single-process run dir, worker logs): both processes launched first, the 8-device
    reference runs in this process meanwhile."""
    root = tmp_path_factory.mktemp("multihost")
    model = tiny_model_dir(root / "model")
    corpus = write_pairs(write_corpus(root / "corpus", n=24, seed=1))
    port = _free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               PERSLLM_XLA_CACHE="0")
    dpo_sets = json.dumps(DPO_SETS)
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(model), str(corpus), str(root / "two"), str(port),
                               str(i), json.dumps(SFT_SETS), dpo_sets], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        from persllm_jax.model.weights import load_model, load_tokenizer
        from persllm_jax.train.config import load_config

        loaded, tok = load_model(str(model)), load_tokenizer(str(model))
        quiet = lambda s: None  # noqa: E731
        base = {"model": str(model), "data": str(corpus)}
        one = root / "one"
        ref = {"sft": sft.run(load_config(overrides=SFT_SETS, base=base), one / "sft", loaded=loaded, tokenizer=tok,
                            progress=False, log=quiet)}
        from persllm_jax.train import dpo
        from persllm_jax.train.config import DPOConfig

        ref["dpo"] = dpo.run(load_config(DPOConfig, overrides=DPO_SETS, base=base), one / "dpo", loaded=loaded,
                             tokenizer=tok, progress=False, log=quiet)
        logs = [p.communicate(timeout=900)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
    return root / "two", one, ref, logs


def _check_equal(two: Path, one: Path, ref_state):
    m2, m1 = _metrics(two), _metrics(one)
    assert [m["step"] for m in m2] == [1, 2, 3]  # process 0 alone writes metrics: each step once
    for key in ("loss", "grad_norm", "trained_tokens"):
        np.testing.assert_allclose([m[key] for m in m2], [m[key] for m in m1], rtol=1e-5, atol=1e-6, err_msg=key)
    assert m2[-1]["loss"] != m2[0]["loss"]
    got, meta = checkpoint.load_trained(two)  # written by both processes through orbax
    assert meta["step"] == 3
    want = jax.device_get(ref_state["trainable"])
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for x, y in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(np.asarray(x), y, rtol=1e-5, atol=1e-5)
    assert max(float(np.abs(np.asarray(b)).max()) for b in jax.tree_util.tree_leaves(got)) > 0


def test_two_processes_sft_equals_one_process(runs):
    two, one, ref, logs = runs
    assert "distributed: 2 processes, 8 devices (4 per process, cpu)" in logs[0]
    assert "distributed:" not in logs[1]  # logging from process 0 only
    assert "[0] processes=2 devices=8 local=4 rows=slice(0, 4, None)" in logs[0]
    assert "[1] processes=2 devices=8 local=4 rows=slice(4, 8, None)" in logs[1]  # each loads its own rows
    _check_equal(two / "sft", one / "sft", ref["sft"]["state"])
    assert json.loads((two / "sft" / "run.json").read_text())["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}


def test_two_processes_dpo_equals_one_process(runs):
    two, one, ref, logs = runs
    # tensor axis across the processes: the batch is replicated, both processes hold all rows
    assert "[0] dpo rows=slice(0, 4, None)" in logs[0] and "[1] dpo rows=slice(0, 4, None)" in logs[1]
    _check_equal(two / "dpo", one / "dpo", ref["dpo"]["state"])
    assert "reward_accuracy" in _metrics(two / "dpo")[0]


def test_init_arguments_from_config_then_environment(monkeypatch):
    from persllm_jax.train import distributed
    from persllm_jax.train.config import load_config

    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_JOB_ID",
                "TPU_WORKER_HOSTNAMES", "CLOUD_TPU_TASK_ID", "KUBERNETES_SERVICE_HOST", "OMPI_MCA_orte_hnp_uri",
                "PMIX_NAMESPACE"):
        monkeypatch.delenv(var, raising=False)
    on = ["distributed=true"]
    assert distributed.init_kwargs(load_config(overrides=on)) == {}  # bare initialize(): JAX autodetects
    cfg = load_config(overrides=on + ["coordinator_address=10.0.0.1:1234", "num_processes=2", "process_id=1"])
    assert distributed.init_kwargs(cfg) == {"coordinator_address": "10.0.0.1:1234", "num_processes": 2,
                                            "process_id": 1}
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.2:99")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "0")
    assert distributed.init_kwargs(load_config(overrides=on)) == {"coordinator_address": "10.0.0.2:99",
                                                                  "num_processes": 4, "process_id": 0}
    assert distributed.init_kwargs(cfg)["coordinator_address"] == "10.0.0.1:1234"  # the config wins
    monkeypatch.delenv("JAX_PROCESS_ID")
    with pytest.raises(distributed.DistributedError, match="set process_id too"):
        distributed.init_kwargs(load_config(overrides=on))
    assert distributed.initialize(load_config()) is False  # distributed=false: nothing happens
