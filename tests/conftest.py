"""Test setup: 8 simulated CPU devices, set before anything imports jax.

XLA programs go to a persistent compilation cache made fresh for this test session
(JAX_COMPILATION_CACHE_DIR, inherited by the subprocesses the tests start): many tests
compile the same tiny-model steps (a run and its resume, one process and its twin), and a
CPU compile of a train step costs 10-30 s on 2 cores. Fresh per session, so no test passes
on a program compiled by another version of the code.
"""

import os
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="mmpo-jax-test-xla-cache-"))
