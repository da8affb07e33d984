"""LoRA: our adapter pytree against PEFT's LoRA on the same weights; zero delta at init; targets; dropout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from tiny import save_tiny

from persllm_jax.model import lora
from persllm_jax.model.decoder import LINEAR_NAMES, forward
from persllm_jax.model.weights import load_model


def _inputs(B=2, T=12, V=131, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, V, (B, T)).astype(np.int32)
    pos = np.tile(np.arange(T, dtype=np.int32), (B, 1))
    seg = np.ones((B, T), np.int32)
    return tokens, pos, seg


@pytest.mark.parametrize("arch,targets", [("llama", ["all-linear"]), ("qwen2", ["q_proj", "v_proj", "down_proj"])])
def test_lora_forward_matches_peft(tmp_path, arch, targets):
    import peft

    torch_model = save_tiny(arch, tmp_path)
    names = list(lora.resolve_targets(targets))
    pcfg = peft.LoraConfig(r=4, lora_alpha=12, target_modules=names, lora_dropout=0.0)
    pm = peft.get_peft_model(torch_model, pcfg)
    torch.manual_seed(1)
    with torch.no_grad():  # B = 0 at PEFT init too; give it a real delta
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    pm.eval()
    state = {k: v.detach().numpy() for k, v in pm.state_dict().items() if "lora_" in k}
    loaded = load_model(str(tmp_path))
    adapter = lora.from_peft_state(state, loaded.cfg.num_layers)
    assert sorted(adapter) == sorted(names)
    tokens, pos, seg = _inputs()
    ours = forward(loaded.params, loaded.cfg, tokens, pos, seg, lora=adapter, lora_scale=lora.lora_scale(4, 12))
    with torch.no_grad():
        ref = pm(input_ids=torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    base = forward(loaded.params, loaded.cfg, tokens, pos, seg)
    assert np.abs(np.asarray(base) - ref).max() > 1e-2  # the adapter really changes the output
    np.testing.assert_allclose(np.asarray(ours), ref, atol=2e-4, rtol=2e-4)
    # and merging the adapter into the base gives the same function
    merged = forward(lora.merge_lora(loaded.params, adapter, lora.lora_scale(4, 12)), loaded.cfg, tokens, pos, seg)
    np.testing.assert_allclose(np.asarray(merged), ref, atol=2e-4, rtol=2e-4)
    # PEFT key round trip
    back = lora.from_peft_state(lora.to_peft_state(adapter), loaded.cfg.num_layers)
    for n in names:
        np.testing.assert_array_equal(np.asarray(back[n]["a"]), np.asarray(adapter[n]["a"]))


def test_step0_equals_base_exactly(tmp_path):
    save_tiny("llama3", tmp_path)
    loaded = load_model(str(tmp_path))
    adapter = lora.init_lora(loaded.cfg, jax.random.PRNGKey(0), 8, ["all-linear"])
    for n in LINEAR_NAMES:
        assert np.abs(np.asarray(adapter[n]["a"])).max() > 0
        assert not np.asarray(adapter[n]["b"]).any()
    tokens, pos, seg = _inputs()
    base = np.asarray(forward(loaded.params, loaded.cfg, tokens, pos, seg))
    with_adapter = np.asarray(forward(loaded.params, loaded.cfg, tokens, pos, seg, lora=adapter, lora_scale=4.0))
    np.testing.assert_array_equal(with_adapter, base)
    dropped = lora.with_dropout(adapter, jax.random.PRNGKey(3), 0.5)
    np.testing.assert_array_equal(
        np.asarray(forward(loaded.params, loaded.cfg, tokens, pos, seg, lora=dropped, lora_scale=4.0)), base)


def test_targets_by_pattern():
    assert lora.resolve_targets(["all-linear"]) == LINEAR_NAMES
    assert lora.resolve_targets(["q_proj", "v_proj"]) == ("q_proj", "v_proj")
    assert lora.resolve_targets(["(q|k|v|o)_proj"]) == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert lora.resolve_targets("gate_proj,up_proj") == ("gate_proj", "up_proj")
    with pytest.raises(lora.LoraError, match="matches no projection"):
        lora.resolve_targets(["qproj"])


def test_dropout_is_on_adapter_input_and_keyed(tmp_path):
    save_tiny("llama", tmp_path)
    loaded = load_model(str(tmp_path))
    cfg = loaded.cfg
    adapter = lora.init_lora(cfg, jax.random.PRNGKey(0), 4, ["q_proj"])
    adapter["q_proj"]["b"] = jax.random.normal(jax.random.PRNGKey(1), adapter["q_proj"]["b"].shape)
    tokens, pos, seg = _inputs()
    f = lambda ad: np.asarray(forward(loaded.params, cfg, tokens, pos, seg, lora=ad, lora_scale=2.0))
    plain = f(adapter)
    d1 = f(lora.with_dropout(adapter, jax.random.PRNGKey(5), 0.3))
    np.testing.assert_array_equal(d1, f(lora.with_dropout(adapter, jax.random.PRNGKey(5), 0.3)))  # deterministic
    assert np.abs(d1 - plain).max() > 1e-3
    assert np.abs(d1 - f(lora.with_dropout(adapter, jax.random.PRNGKey(6), 0.3))).max() > 1e-3
    np.testing.assert_array_equal(f(lora.with_dropout(adapter, jax.random.PRNGKey(5), 0.0)), plain)
