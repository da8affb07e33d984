"""The benchmarks' --hugepages switch: the glibc tunable it sets is the one that makes malloc use huge pages."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools"
sys.path.insert(0, str(TOOLS))
import bench_train  # noqa: E402

CHILD = """
import ctypes
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
p = libc.malloc(256 << 20)  # glibc's malloc itself (numpy madvises its own large arrays), mapped fresh
ctypes.memset(p, 1, 256 << 20)
huge = sum(int(line.split()[1]) for line in open("/proc/self/smaps_rollup") if line.startswith("AnonHugePages:"))
print(huge)
"""


def test_hugepages_env_adds_the_tunable_once_and_keeps_others():
    env = bench_train.hugepages_env({"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert env["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{bench_train.HUGEPAGES}" and env["PATH"] == "/bin"
    assert bench_train.hugepages_env({})["GLIBC_TUNABLES"] == bench_train.HUGEPAGES
    assert bench_train.hugepages_env(env) is None


def test_hugepages_env_makes_malloc_use_huge_pages():
    mode = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not mode.exists() or "[madvise]" not in mode.read_text():
        pytest.skip("the tunable's effect shows only under the kernel's THP mode `madvise`")
    run = lambda env: int(subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True,  # noqa: E731
                                         check=True).stdout)
    plain = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    assert run(plain) == 0
    assert run(bench_train.hugepages_env(plain)) >= 128 << 10  # KiB: at least half of the array on huge pages
