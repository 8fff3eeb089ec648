"""The XLA flags every test process runs with, and the environment of the CLI subprocesses.

Compilation, not execution, is most of this suite's time: the jitted gradient of
test_model_llama's 3-layer model (batch [3, 16]) took 10 s to compile on a 2-core machine
and 0.2-0.6 s to run. XLA's CPU backend compiled it in 2 s with its elemental emitters
instead of the fusion emitters and LLVM at -O0 (`.lower(...).compile()` timed, jax 0.10.2).
The flags change how XLA generates machine code, not what the program computes, so every
comparison against PyTorch, numpy or a second run of ours keeps its tolerance. Users' runs
never see them.
"""

import os

COMPILE_FAST = "--xla_cpu_use_fusion_emitters=false --xla_backend_optimization_level=0"


def xla_flags(devices: int, fast_compile: bool = True) -> str:
    """`XLA_FLAGS` for a process with `devices` simulated CPU devices (1: the plain CPU)."""
    flags = [COMPILE_FAST] if fast_compile else []
    if devices > 1:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    return " ".join(flags)


def cli_env(devices: int = 1, fast_compile: bool = True) -> dict[str, str]:
    """This process's environment for a CLI subprocess on `devices` CPU devices.
    `fast_compile=False` for runs whose execution outweighs their compiles (a 135M model)."""
    return {**os.environ, "XLA_FLAGS": xla_flags(devices, fast_compile), "JAX_PLATFORMS": "cpu"}
