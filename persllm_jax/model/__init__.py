"""The model: our Llama-family decoder in JAX and everything about its weights.

    config.py    ModelConfig, read from a Hugging Face config.json
    decoder.py   the decoder (init, forward, KV-cache forward), pure functions over a params pytree
    attention.py which training attention runs (flash, cuDNN, splash, reference): the `attention` config key
    flash_attention.py  flash attention in plain JAX (online softmax, recomputing backward), any backend
    lora.py      LoRA as a separate pytree beside the frozen base
    shapes.py    named public shapes (`shape:llama-8b`) to plan without weights
    weights.py   weights in: HF safetensors directories and GGUF files

May import: errors, io. Nothing else of ours: every other layer builds on this one.

`persllm_jax.model.forward` and the decoder's other functions keep working from here for one release (they
moved to `persllm_jax.model.decoder`).
"""


_SUBMODULES = ("attention", "config", "decoder", "flash_attention", "lora", "shapes", "weights")


def __getattr__(name):  # the pre-0.2 import path `persllm_jax.model.forward` etc.
    import importlib

    if name.startswith("__") or name in _SUBMODULES:
        raise AttributeError(f"module 'persllm_jax.model' has no attribute {name!r}")
    decoder = importlib.import_module("persllm_jax.model.decoder")
    try:
        return getattr(decoder, name)
    except AttributeError:
        raise AttributeError(f"module 'persllm_jax.model' has no attribute {name!r}") from None
