"""A non-editable install ships the web pages: build the wheel and find every static asset in it."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_ships_every_static_asset(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for pkg in ("persllm_jax", "data_gen"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                        str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    static = ROOT / "persllm_jax" / "serve" / "web" / "static"
    want = {f"persllm_jax/serve/web/static/{p.relative_to(static).as_posix()}" for p in static.rglob("*") if p.is_file()}
    assert want and want <= names, sorted(want - names)
    assert {"persllm_jax/serve/__init__.py", "persllm_jax/serve/web/__init__.py", "persllm_jax/serve/web/rate.py",
            "persllm_jax/eval/human.py"} <= names
