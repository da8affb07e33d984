import os
import tempfile

# 8 emulated CPU devices run a sharded step as 8 threads that meet at every all-reduce; on 2 busy cores one of
# them can be starved past XLA's 40 s rendezvous limit, which aborts the process (seen in CI as a SIGABRT
# in test_reproduce's resumed SFT): the suite allows 10 minutes instead.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      "--xla_cpu_collective_call_terminate_timeout_seconds=600")
# The suite runs on the CPU; with libtpu installed (the test extra, for deviceless TPU compiles) JAX would
# otherwise probe for a TPU and warn on stderr in every process.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# GGUF conversions and compiled programs go to a per-session cache, never the user's home.
os.environ.setdefault("PERSLLM_CACHE", tempfile.mkdtemp(prefix="persllm-test-cache-"))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
