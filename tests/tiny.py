"""Tiny random transformers models for parity tests (odd sizes, GQA, non-default rope_theta)."""

import torch
import transformers

ARCHS = ("llama", "llama3", "mistral", "qwen2", "qwen3", "smollm2")


def tiny_config(arch: str, **overrides):
    common = dict(vocab_size=131, hidden_size=48, intermediate_size=100, num_hidden_layers=3,
                  num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-5, initializer_range=0.5, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    common.update(overrides)
    rope = {"rope_type": "default", "rope_theta": 5000.0}
    if arch == "llama":
        return transformers.LlamaConfig(**common, rope_parameters=rope, tie_word_embeddings=False)
    if arch == "llama3":
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
        return transformers.LlamaConfig(**common, rope_parameters=rope, tie_word_embeddings=False)
    if arch == "smollm2":
        return transformers.LlamaConfig(**common, rope_parameters=rope, tie_word_embeddings=True)
    if arch == "mistral":
        return transformers.MistralConfig(**common, rope_parameters=rope, sliding_window=7, head_dim=8)
    if arch == "qwen2":
        return transformers.Qwen2Config(**common, rope_parameters=rope, tie_word_embeddings=True)
    if arch == "qwen3":
        return transformers.Qwen3Config(**common, rope_parameters=rope, head_dim=10, tie_word_embeddings=False)
    raise ValueError(arch)


def save_tiny(arch: str, path, seed: int = 0, **overrides):
    """Save a tiny random model as an HF directory; returns the torch model (eval mode, fp32)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(arch, **overrides), dtype=torch.float32)
    model.eval()
    model.save_pretrained(path)
    return model
