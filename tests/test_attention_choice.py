"""The attention kernel chosen once, at build time, from one table (`mmpo_jax.models.kernels`):
`auto` picks what it picked before (packed rows on GPU: xla at build time, said once at
start, where cuDNN used to switch to xla at trace time with a warning); a kernel that
cannot run stops at start naming both keys; `mmpo-jax config --backend` and `aot-check`
apply the refusals that need no checkpoint."""

import subprocess
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mmpo_jax import cli
from mmpo_jax.config import load_config
from mmpo_jax.errors import UserError
from mmpo_jax.models.attention import Segments
from mmpo_jax.models.decoder import Decoder
from mmpo_jax.models.decoder_config import model_config_from_init
from mmpo_jax.models.kernels import AUTO_PREFERENCE, BACKENDS, KERNELS, Needs, check_kernel, choose_kernel
from mmpo_jax.models.options import ATTENTION_CHOICES, ModelOptions
from mmpo_jax.train.setup import build_policy, model_options

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


def _before(backend: str, compute_dtype: str, head_dim: int, soft_cap: bool, segments: bool) -> str:
    """What `auto` ran before the table, as `ModelOptions.attention_implementation` chose
    it at build (3a9705f) and `Attention.__call__` switched cuDNN to xla for segment ids."""
    if backend == "tpu":
        return "splash"
    if soft_cap:
        return "xla"
    if backend == "gpu" and compute_dtype in ("bfloat16", "float16") and head_dim % 8 == 0 and head_dim <= 128:
        return "xla" if segments else "cudnn"
    return "xla"


def test_the_table_has_a_row_per_model_attention_choice():
    assert set(KERNELS) | {"auto"} == set(ATTENTION_CHOICES)
    assert set(AUTO_PREFERENCE) <= set(KERNELS) and AUTO_PREFERENCE[-1] == "xla"
    assert all(set(k.backends) | set(k.interpreted) <= set(BACKENDS) for k in KERNELS.values())


@pytest.mark.parametrize("backend", BACKENDS)
def test_auto_picks_what_it_ran_before_for_every_case(backend):
    for dtype in ("float32", "bfloat16", "float16"):
        for head_dim in (32, 60, 64, 128, 256):
            for soft_cap in (False, True):
                for window in (False, True):
                    for segments in (False, True):
                        needs = Needs(dtype, segments, head_dim, soft_cap, window)
                        got = choose_kernel("auto", needs, backend)
                        assert got.kernel == _before(backend, dtype, head_dim, soft_cap, segments), needs
                        assert got.reason and got.start_line().startswith(f"attention: model.attention=auto -> {got.kernel} (")


@pytest.mark.parametrize("backend, segments, soft_cap, kernel, says", [
    ("cpu", False, False, "xla", "the first choice on CPU"),
    ("cpu", True, True, "xla", "the first choice on CPU"),
    ("gpu", False, False, "cudnn", "the first choice on GPU"),
    ("gpu", True, False, "xla", "cudnn takes no segment ids, which a packed data.packing"),
    ("gpu", False, True, "xla", "cudnn takes no attention logit soft-cap"),
    ("gpu", True, True, "xla", "cudnn takes no attention logit soft-cap"),
    ("tpu", False, False, "splash", "the first choice on TPU"),
    ("tpu", True, True, "splash", "the first choice on TPU"),
])
def test_auto_says_why(backend, segments, soft_cap, kernel, says):
    choice = choose_kernel("auto", Needs("bfloat16", segments, 64, soft_cap), backend)
    assert choice.kernel == kernel and says in choice.reason
    # packed rows on GPU: the fused kernel that takes them is named as the way to it
    assert ("model.attention=pallas_gpu runs here too" in choice.reason) == (backend == "gpu" and segments and not soft_cap)


@pytest.mark.parametrize("requested, backend, needs, keys", [
    ("cudnn", "gpu", Needs("bfloat16", segments=True), ("model.attention=cudnn", "data.packing", "data.packing=none")),
    ("cudnn", "gpu", Needs("float32"), ("model.attention=cudnn", "model.compute_dtype", "model.compute_dtype=bfloat16")),
    ("cudnn", "gpu", Needs("bfloat16", soft_cap=True), ("model.attention=cudnn", "attn_logit_softcapping")),
    ("cudnn", "gpu", Needs("bfloat16", head_dim=260), ("model.attention=cudnn", "head_dim", "260")),
    ("cudnn", "tpu", Needs("bfloat16"), ("model.attention=cudnn is a GPU kernel", "not one for tpu")),
    ("pallas_gpu", "gpu", Needs("bfloat16", soft_cap=True), ("model.attention=pallas_gpu", "attn_logit_softcapping")),
    ("pallas_gpu", "gpu", Needs("bfloat16", sliding_window=True), ("model.attention=pallas_gpu", "sliding_window")),
    ("pallas_gpu", "tpu", Needs("bfloat16"), ("model.attention=pallas_gpu is a GPU kernel", "not one for tpu")),
    ("splash", "gpu", Needs("bfloat16"), ("model.attention=splash is a TPU kernel", "not one for gpu")),
])
def test_a_kernel_that_cannot_run_is_refused_naming_both_keys_and_the_fix(requested, backend, needs, keys):
    with pytest.raises(UserError) as err:
        choose_kernel(requested, needs, backend)
    message = str(err.value)
    assert all(key in message for key in keys), message
    assert "set model.attention to auto" in message  # auto always runs: the first way out


def test_what_runs_is_not_refused():
    """Negative control: each kernel on its own backends (and interpreted where the tests run it)."""
    for name, kernel in KERNELS.items():
        for backend in (*kernel.backends, *kernel.interpreted):
            dtype = (kernel.compute_dtypes or ("float32",))[0]
            assert choose_kernel(name, Needs(dtype, kernel.segments, 64), backend).kernel == name
            assert choose_kernel(name, Needs(dtype, kernel.segments, 64), backend).reason is None
    assert choose_kernel("cudnn", Needs("bfloat16", head_dim=256), "gpu").kernel == "cudnn"  # Hopper's limit


def test_check_kernel_without_a_backend_refuses_only_what_no_backend_runs():
    check_kernel("cudnn", "auto", False, None)  # a GPU runs it
    check_kernel("splash", "auto", True, None)  # a TPU runs it
    with pytest.raises(UserError, match="model.attention=cudnn takes no segment ids.*data.packing"):
        check_kernel("cudnn", "auto", True, None)
    with pytest.raises(UserError, match="model.compute_dtype bfloat16 or float16, not float32"):
        check_kernel("cudnn", "float32", False, None)
    check_kernel("auto", "float32", True, "gpu")


# --------------------------------------------------------------------------- #
# the commands: refused at start, before any model or libtpu
# --------------------------------------------------------------------------- #
def test_config_for_a_gpu_refuses_cudnn_with_packed_rows(capsys):
    assert cli.main(["config", TINY, "model.attention=cudnn", "data.packing=packed", "--backend", "gpu"]) == 2
    err = capsys.readouterr().err
    assert "model.attention=cudnn" in err and "data.packing" in err and "Traceback" not in err
    assert cli.main(["config", TINY, "model.attention=pallas_gpu", "--backend", "tpu"]) == 2
    assert "model.attention=pallas_gpu is a GPU kernel" in capsys.readouterr().err


def test_config_prints_the_same_with_a_backend_that_runs_it(capsys):
    assert cli.main(["config", TINY, "model.attention=cudnn"]) == 0
    plain = capsys.readouterr().out
    assert cli.main(["config", TINY, "model.attention=cudnn", "--backend", "gpu"]) == 0
    assert capsys.readouterr().out == plain
    assert cli.main(["config", TINY, "model.attention=cudnn", "--backend", "cpu"]) == 2  # cuDNN is GPU-only
    assert "not one for cpu" in capsys.readouterr().err


def test_config_with_a_backend_imports_no_jax():
    code = ("import sys, io, contextlib; from mmpo_jax import cli\n"
            "with contextlib.redirect_stdout(io.StringIO()): rc = cli.main(['config', %r, '--backend', 'gpu'])\n"
            "print(rc, 'jax' in sys.modules)" % TINY)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.split() == ["0", "False"], out.stdout + out.stderr


def test_aot_check_refuses_a_gpu_kernel_for_a_tpu_before_compiling(capsys):
    assert cli.main(["aot-check", "--topology", "v5e:2x2", TINY, "model.attention=pallas_gpu"]) == 2
    err = capsys.readouterr().err
    assert "model.attention=pallas_gpu is a GPU kernel" in err and "not one for tpu" in err


# --------------------------------------------------------------------------- #
# the model: the kernel fixed at build, never switched at trace time
# --------------------------------------------------------------------------- #
def _attention_kernels(model: Decoder) -> set[str]:
    return {m.implementation for _, m in nnx.iter_graph(model) if hasattr(m, "implementation")}


def test_packed_rows_on_a_gpu_build_xla_and_the_model_never_switches():
    """A run settled for a GPU (bf16, head_dim 16) with packed rows holds xla in its options
    and layers; its forward over segment ids warns nothing and equals an explicit xla model."""
    cfg = load_config(TINY, ["data.packing=packed"])
    arch = model_config_from_init(cfg.model.init)
    options = model_options(cfg, "gpu")
    assert options.segments and options.kernel is None and options.attention == "auto"
    model = Decoder(arch, options, rngs=nnx.Rngs(0))
    assert model.options.kernel == "xla" and _attention_kernels(model) == {"xla"}
    explicit = Decoder(arch, ModelOptions(compute_dtype="bfloat16", attention="xla", backend="gpu"),
                       rngs=nnx.Rngs(0))
    ids = jnp.asarray(np.arange(2 * 16).reshape(2, 16) % arch.vocab_size, jnp.int32)
    seg = jnp.asarray(np.repeat([[1, 2]], 8, axis=1).repeat(2, axis=0), jnp.int32)
    positions = jnp.asarray(np.tile(np.arange(8), 2)[None].repeat(2, axis=0), jnp.int32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the old trace-time switch warned here
        got = model(ids, positions=positions, segments=Segments(seg))
    want = explicit(ids, positions=positions, segments=Segments(seg))
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_negative_control_unpacked_rows_on_a_gpu_build_cudnn_which_takes_no_segments():
    """The same GPU settings without packing choose cuDNN, so the test above sees the layout;
    and segment ids handed to that model are an error, not a quiet switch to xla."""
    cfg = load_config(TINY)
    arch = model_config_from_init(cfg.model.init)
    model = Decoder(arch, model_options(cfg, "gpu"), rngs=nnx.Rngs(0))
    assert model.options.kernel == "cudnn" and _attention_kernels(model) == {"cudnn"}
    ids = jnp.zeros((1, 8), jnp.int32)
    with pytest.raises(ValueError, match="cudnn.*segment ids"):
        model(ids, positions=jnp.arange(8, dtype=jnp.int32)[None], segments=Segments(jnp.ones((1, 8), jnp.int32)))


def test_a_refused_kernel_stops_at_build():
    cfg = load_config(TINY, ["model.attention=cudnn", "data.packing=packed"])
    arch = model_config_from_init(cfg.model.init)
    with pytest.raises(UserError, match="model.attention=cudnn takes no segment ids.*data.packing"):
        Decoder(arch, model_options(cfg, "gpu"), rngs=nnx.Rngs(0))


def test_auto_is_said_once_at_start_and_an_explicit_kernel_is_not():
    said: list[str] = []
    _, _, options = build_policy(load_config(TINY, ["data.packing=packed"]), say=said.append)
    backend = jax.default_backend()
    assert options.kernel == ("splash" if backend == "tpu" else "xla") and options.segments
    assert len(said) == 1 and said[0].startswith(f"attention: model.attention=auto -> {options.kernel} ("), said
    said.clear()
    _, _, options = build_policy(load_config(TINY, ["model.attention=xla"]), say=said.append)
    assert options.kernel == "xla" and said == []
