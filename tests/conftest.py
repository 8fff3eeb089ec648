"""Test setup: 8 simulated CPU devices and fast-compiling XLA flags (tests/cpu_env.py), set
before anything imports jax.

XLA programs go to a persistent compilation cache made fresh for this test session
(JAX_COMPILATION_CACHE_DIR, inherited by the subprocesses the tests start): many tests
compile the same tiny-model steps (a run and its resume, one process and its twin), and a
CPU compile of a train step costs 10-30 s on 2 cores. Fresh per session, so no test passes
on a program compiled by another version of the code.
"""

import atexit
import os
import shutil
import tempfile

from cpu_env import xla_flags

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    # (pytest-xdist's workers inherit it, and the cache below, from the controller)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + xla_flags(8)).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="mmpo-jax-test-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
