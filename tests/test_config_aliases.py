"""TRL / PEFT names for our train config keys: accepted in a file and in `--set`, stored and printed under our
name, both names at once an error, listed in `--help`; the aliases are real TRL 1.16 / PEFT field names; the
reproduce recipe passes `report_to` (and aliases) to its training stages."""

import dataclasses

import pytest
import yaml
from click.testing import CliRunner

from persllm_jax import settings
from persllm_jax.cli import main
from persllm_jax.train.config import ConfigError, DPOConfig, TrainConfig, load_config


def test_trl_names_in_a_file_and_in_set(tmp_path):
    f = tmp_path / "trl.yaml"
    f.write_text(yaml.safe_dump({"gradient_accumulation_steps": 4, "batch_size": 2, "max_steps": 9,
                                 "logging_steps": 3, "save_steps": 5, "eval_steps": 3, "lora_r": 8, "lora_alpha": 16,
                                 "rpo_alpha": 0.5, "precompute_ref_log_probs": True, "num_train_epochs": 2}))
    cfg = load_config(DPOConfig, f, ["lora.target_modules=[q_proj, v_proj]", "adam_beta2=0.99"])
    assert (cfg.grad_accum, cfg.batch_size, cfg.steps, cfg.log_every, cfg.save_every, cfg.eval_every) == (4, 2, 9, 3, 5, 3)
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets) == (8, 16.0, ["q_proj", "v_proj"])
    assert (cfg.nll_weight, cfg.precompute_ref, cfg.epochs, cfg.adam_b2) == (0.5, True, 2.0, 0.99)
    dumped = yaml.safe_load(settings.dump(cfg))  # our names only
    assert "grad_accum" in dumped and "gradient_accumulation_steps" not in dumped and "lora_r" not in dumped
    assert load_config(TrainConfig, None, ["lora.r=2"]).lora.rank == 2  # PEFT's own name inside the section


@pytest.mark.parametrize("over", [{"grad_accum": 2, "gradient_accumulation_steps": 3},
                                  {"lora": {"rank": 4}, "lora_r": 8},
                                  {"lora": {"rank": 4, "r": 8}}])
def test_both_names_is_an_error(tmp_path, over):
    f = tmp_path / "both.yaml"
    f.write_text(yaml.safe_dump(over))
    with pytest.raises(ConfigError, match=r"both.yaml: .* is another name for .*; give only one of them"):
        load_config(TrainConfig, f)


def test_both_names_in_set_is_an_error():
    with pytest.raises(ConfigError, match="grad_accum and gradient_accumulation_steps name the same key"):
        load_config(TrainConfig, None, ["grad_accum=2", "gradient_accumulation_steps=3"])
    assert load_config(TrainConfig, None, ["grad_accum=2", "grad_accum=3"]).grad_accum == 3  # one name: last wins


def test_errors_name_our_key(tmp_path):
    # TRL's per-device batch is not our global one: no silent alias, an error that says what to set
    with pytest.raises(ConfigError, match="our batch_size is the global batch"):
        load_config(TrainConfig, None, ["per_device_train_batch_size=2"])
    with pytest.raises(ConfigError, match="--set max_steps: steps must be an integer"):
        load_config(TrainConfig, None, ["max_steps=many"])
    with pytest.raises(ConfigError, match="invalid value for grad_accum: 0"):
        load_config(TrainConfig, None, ["gradient_accumulation_steps=0"])


def test_aliases_are_trl_and_peft_field_names():
    import peft
    import trl

    trl_names = ({f.name for f in dataclasses.fields(trl.DPOConfig)} | {f.name for f in dataclasses.fields(trl.SFTConfig)}
                 | {f.name for f in dataclasses.fields(trl.ModelConfig)})
    peft_names = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    table = settings.aliases(DPOConfig)
    assert table["gradient_accumulation_steps"] == "grad_accum" and table["lora_r"] == "lora.rank"
    for alias in table:
        if alias == "rpo_alpha":  # TRL 0.x's DPOConfig name (1.16 spells RPO loss_type=["sigmoid", "sft"])
            continue
        if alias.startswith("lora."):
            assert alias[len("lora."):] in peft_names, alias
        else:
            assert alias in trl_names, alias
    assert set(table.values()) <= set(settings.valid_keys(DPOConfig))


def test_cli_set_alias_overrides_cli_option_and_help_lists_aliases(tmp_path):
    r = CliRunner().invoke(main, ["train", "sft", "--out", str(tmp_path / "r"), "--model", "smollm2",
                                  "--set", "model_name_or_path=other", "--set", "max_steps=3", "--print-config"])
    assert r.exit_code == 0, r.output
    printed = yaml.safe_load(r.output)
    assert printed["model"] == "other" and printed["steps"] == 3  # --set beats --model, under either name
    help_text = " ".join(CliRunner().invoke(main, ["train", "dpo", "--help"]).output.split())
    assert "gradient_accumulation_steps -> grad_accum" in help_text and "rpo_alpha -> nll_weight" in help_text


def test_reproduce_passes_report_to_and_aliases_to_training_stages():
    from persllm_jax.pipeline import config as pc

    cfg = pc.load(None, ["report_to=[tensorboard]", "dpo.report_to=[wandb]", "sft.gradient_accumulation_steps=2"])
    assert pc.train_config(cfg, "sft").report_to == ["tensorboard"]
    assert pc.train_config(cfg, "dpo").report_to == ["wandb"]
    assert pc.stage_config(cfg, "sft")["grad_accum"] == 2
