"""Hub push against a fake hub on 127.0.0.1 (HF_ENDPOINT): the exported files arrive byte for byte, the token is
sent only as the Authorization header and appears in no file, log or error; --dry-run uploads nothing."""

import pytest
from chat_fixtures import tiny_model_dir
from click.testing import CliRunner
from export_runs import random_adapter, write_run
from fake_hub import FakeHub

from persllm_jax.cli import main
from persllm_jax.model.weights import load_model

TOKEN = "hf_FAKEtoken0123456789secretXYZ"


@pytest.fixture(autouse=True)
def _online(monkeypatch):
    """conftest sets HF_HUB_OFFLINE=1 (read once at import); the fake hub is local, so allow requests to it."""
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    model = tiny_model_dir(root / "model", arch="smollm2")
    ad = random_adapter(load_model(str(model)).cfg, 2, seed=3)
    return write_run(root / "run", model, ad, alpha=4.0)


def _invoke(args, env):
    return CliRunner().invoke(main, ["export", *map(str, args)], env=env)


def _all_bytes(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_push_uploads_every_file_and_sends_the_token_only_as_auth_header(run, tmp_path, caplog):
    with FakeHub(TOKEN) as hub:
        env = {"HF_TOKEN": TOKEN, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1"}
        res = _invoke(["--run", run, "--out", tmp_path / "out", "--format", "peft", "--push-to-hub", "acme/harry",
                       "--private"], env)
        assert res.exit_code == 0, res.output
        assert "pushed to acme/harry" in res.output
        local = _all_bytes(tmp_path / "out")
        assert local.pop(".persllm-output.json")  # our output marker stays local: it is not part of the model
        assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(local)
        repo = hub.repos["acme/harry"]
        assert repo["private"] is True
        assert repo["files"] == local  # every file, byte for byte
        assert hub.requests and all(r["headers"].get("authorization") == f"Bearer {TOKEN}" for r in hub.requests)
        for r in hub.requests:
            assert TOKEN not in r["path"] and TOKEN.encode() not in r["body"]
            assert all(TOKEN not in v for k, v in r["headers"].items() if k.lower() != "authorization")
        # pushing again into the existing repo works (create_repo exist_ok)
        res = _invoke(["--run", run, "--out", tmp_path / "out", "--overwrite", "--push-to-hub", "acme/harry"], env)
        assert res.exit_code == 0, res.output
        assert "model.safetensors" in hub.repos["acme/harry"]["files"]
    assert TOKEN not in res.output and TOKEN not in caplog.text
    for data in _all_bytes(tmp_path).values():
        assert TOKEN.encode() not in data


def test_wrong_token_is_a_clear_error_without_the_token(run, tmp_path):
    with FakeHub("hf_the_right_one") as hub:
        env = {"HF_TOKEN": TOKEN, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0"}
        res = _invoke(["--run", run, "--out", tmp_path / "out", "--push-to-hub", "acme/x"], env)
    assert res.exit_code != 0 and "push to acme/x failed" in res.output, res.output
    assert TOKEN not in res.output and "Traceback" not in res.output


def test_dry_run_lists_files_and_contacts_nothing(run, tmp_path):
    with FakeHub(TOKEN) as hub:
        env = {"HF_TOKEN": "", "HF_ENDPOINT": hub.url}  # no token needed for a dry run
        res = _invoke(["--run", run, "--out", tmp_path / "out", "--push-to-hub", "acme/dry", "--dry-run"], env)
        assert res.exit_code == 0, res.output
        assert hub.requests == []
    assert "would create repo acme/dry" in res.output
    for name in ("model.safetensors", "config.json", "generation_config.json", "README.md", "tokenizer.json"):
        assert f"  {name}  " in res.output, name
