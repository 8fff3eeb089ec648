"""The attention entry point (`mmpo_jax.models.attention`) against attention written out
in numpy: every mask the spec can say, grouped-query heads, both backends on CPU
(xla), and the KV-cache path against the whole-sequence path."""

import jax
import numpy as np
import pytest

import jax.numpy as jnp

from mmpo_jax.errors import UserError
from mmpo_jax.models.attention import MaskSpec, Segments, attention, cached_attention, sequence_mask


def numpy_attention(q, k, v, scale, *, causal=True, window=None, soft_cap=None, segments=None):
    """Float64 attention, one query at a time: the keys it may see, softmax over them."""
    b, t, n, h = q.shape
    kv = k.shape[2]
    out = np.zeros((b, t, n, h))
    for bi in range(b):
        for i in range(t):
            seen = [j for j in range(t)
                    if (not causal or j <= i) and (window is None or i - j < window)
                    and (segments is None or segments[bi, i] == segments[bi, j])]
            for hn in range(n):
                g = hn // (n // kv)
                s = np.array([q[bi, i, hn] @ k[bi, j, g] for j in seen], np.float64) * scale
                if soft_cap is not None:
                    s = soft_cap * np.tanh(s / soft_cap)
                p = np.exp(s - s.max())
                p /= p.sum()
                out[bi, i, hn] = sum(pj * v[bi, j, g] for pj, j in zip(p, seen))
    return out


def qkv(b=2, t=7, n=4, kv=2, h=8, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=s).astype(np.float32) for s in ((b, t, n, h), (b, t, kv, h), (b, t, kv, h))]


CASES = {
    "causal": dict(),
    "window": dict(window=3),
    "soft_cap": dict(soft_cap=2.0),
    "segments": dict(segments=np.array([[0, 0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 1, 1, 1]])),
    "all": dict(window=2, soft_cap=1.5, segments=np.array([[0, 0, 1, 1, 1, 1, 2], [0, 0, 0, 0, 1, 1, 1]])),
}


@pytest.mark.parametrize("case", CASES)
def test_attention_matches_numpy(case):
    kw = CASES[case]
    q, k, v = qkv()
    scale = 8 ** -0.5
    spec = MaskSpec(causal=True, sliding_window=kw.get("window"), soft_cap=kw.get("soft_cap"))
    seg = kw.get("segments")
    got = attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), spec, scale=scale, implementation="xla",
                    segments=None if seg is None else Segments(jnp.asarray(seg)))
    want = numpy_attention(q, k, v, scale, **kw)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=2e-5)


def test_a_mask_that_is_ignored_is_caught():
    """Negative control: the reference does see the difference a window makes."""
    q, k, v = qkv()
    got = attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), MaskSpec(sliding_window=2), scale=0.3,
                    implementation="xla")
    assert np.abs(np.asarray(got) - numpy_attention(q, k, v, 0.3)).max() > 1e-2


@pytest.mark.parametrize("soft_cap", [None, 2.0])
def test_cache_path_equals_the_sequence_path(soft_cap):
    """Generation's cached attention, given the sequence mask, gives the training path's output."""
    q, k, v = qkv()
    spec = MaskSpec(sliding_window=4, soft_cap=soft_cap)
    whole = attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), spec, scale=0.25, implementation="xla")
    allowed = jnp.broadcast_to(sequence_mask(spec, q.shape[1]), (q.shape[0], q.shape[1], q.shape[1]))
    cached = cached_attention(jnp.asarray(q), jnp.asarray(k).transpose(0, 2, 1, 3),
                              jnp.asarray(v).transpose(0, 2, 1, 3), allowed, spec, scale=0.25)
    np.testing.assert_allclose(np.asarray(cached), np.asarray(whole), atol=2e-6)


def test_a_query_that_sees_nothing_gets_no_nan():
    q, k, v = qkv(b=1, t=3)
    allowed = jnp.asarray([[[False, False, False], [True, False, False], [True, True, False]]])
    out = cached_attention(jnp.asarray(q), jnp.asarray(k).transpose(0, 2, 1, 3), jnp.asarray(v).transpose(0, 2, 1, 3),
                           allowed, MaskSpec(), scale=0.3)
    assert np.isfinite(np.asarray(out)).all()


def test_bad_specs_and_unsupported_backends_are_refused():
    with pytest.raises(ValueError, match="sliding_window"):
        MaskSpec(causal=False, sliding_window=4)
    with pytest.raises(ValueError, match="soft_cap"):
        MaskSpec(soft_cap=0.0)
    q, k, v = (jnp.asarray(a) for a in qkv())
    # a mask the kernel does not take: the build-time choice refuses it with a UserError
    # (tests/test_attention_choice.py); a caller that skipped it gets a ValueError, not a dropped mask
    with pytest.raises(ValueError, match="cudnn.*soft-cap"):
        attention(q, k, v, MaskSpec(soft_cap=5.0), scale=0.3, implementation="cudnn")
    with pytest.raises(ValueError, match="segment ids"):
        attention(q, k, v, MaskSpec(), scale=0.3, implementation="cudnn", segments=Segments(jnp.zeros((2, 7), int)))
    with pytest.raises(ValueError, match="implementation"):
        attention(q, k, v, MaskSpec(), scale=0.3, implementation="flash")


# The Pallas kernels (TPU splash, the GPU flash kernel) in interpret mode (slow: T <= 512,
# few heads), against the xla backend (itself checked against numpy above).
def _kernel_vs_xla(impl, spec, segments=None, *, t=200, n=2, kv=1, mesh=None, grads=False, branched=False):
    q, k, v = (jnp.asarray(a) for a in qkv(b=2, t=t, n=n, kv=kv, h=32, seed=3))
    seg = None if segments is None else Segments(jnp.asarray(segments), branched=branched)

    def run(impl):
        def f(q, k, v):
            return attention(q, k, v, spec, scale=32 ** -0.5, implementation=impl, segments=seg, mesh=mesh,
                             interpret=True)
        if not grads:
            return [f(q, k, v)]
        weights = jnp.cos(jnp.arange(32.0))  # a loss that reads every output feature differently
        return [f(q, k, v), *jax.grad(lambda *a: jnp.sum(f(*a) * weights), argnums=(0, 1, 2))(q, k, v)]

    for got, want in zip(run(impl), run("xla")):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)


def _two_segments(t, first):
    """Row 0: segments 1 (first tokens), 2, then padding 0; row 1: one segment and padding."""
    seg = np.zeros((2, t), np.int32)
    seg[0, :first], seg[0, first:t - 20] = 1, 2
    seg[1, :t - 40] = 1
    return seg


@pytest.mark.slow
def test_splash_equals_xla_on_packed_rows_with_grouped_heads_forward_and_backward():
    # T = 200 is padded to 256 inside the call; 4 query heads on 2 kv heads
    _kernel_vs_xla("splash", MaskSpec(), _two_segments(200, 70), n=4, kv=2, grads=True)


@pytest.mark.slow
def test_splash_window_and_soft_cap_equal_xla():
    _kernel_vs_xla("splash", MaskSpec(sliding_window=50, soft_cap=3.0), _two_segments(256, 90), t=256)


def test_splash_under_a_mesh_equals_xla():
    from mmpo_jax.config_schema import MeshConfig
    from mmpo_jax.sharding import make_mesh

    mesh = make_mesh(MeshConfig(data=2, fsdp=1, tensor=2), devices=jax.devices()[:4])
    _kernel_vs_xla("splash", MaskSpec(), _two_segments(128, 40), t=128, n=4, kv=2, mesh=mesh)


@pytest.mark.parametrize("kernel", ["splash", "pallas_gpu"])
def test_kernel_negative_control_segments_matter(kernel):
    """A Pallas kernel without the segment ids differs from xla with them: the comparison sees masks."""
    q, k, v = (jnp.asarray(a) for a in qkv(b=2, t=128, n=2, kv=1, h=32, seed=3))
    seg = jnp.asarray(_two_segments(128, 40))
    got = attention(q, k, v, MaskSpec(), scale=0.2, implementation=kernel, interpret=True)
    want = attention(q, k, v, MaskSpec(), scale=0.2, implementation="xla", segments=Segments(seg))
    assert np.abs(np.asarray(got) - np.asarray(want)).max() > 1e-2


def test_auto_picks_splash_on_tpu_and_splash_is_refused_on_gpu():
    from mmpo_jax.models.options import ModelOptions

    def pick(attention, backend, soft_cap=False):
        options = ModelOptions(param_dtype="float32", compute_dtype="bfloat16", attention=attention, backend=backend)
        return options.attention_implementation(64, soft_cap=soft_cap)

    assert pick("auto", "tpu") == "splash" and pick("auto", "tpu", soft_cap=True) == "splash"
    assert pick("auto", "gpu") == "cudnn" and pick("auto", "gpu", soft_cap=True) == "xla"
    assert pick("auto", "cpu") == "xla" and pick("splash", "cpu") == "splash"
    with pytest.raises(UserError, match="splash is a TPU kernel"):
        pick("splash", "gpu")


def test_pallas_gpu_equals_xla_on_packed_rows_with_grouped_heads_forward_and_backward():
    # T = 200 is padded to 256 inside the call; 4 query heads on 2 kv heads, repeated for it
    _kernel_vs_xla("pallas_gpu", MaskSpec(), _two_segments(200, 70), n=4, kv=2, grads=True)


@pytest.mark.slow
def test_pallas_gpu_on_padded_rows_and_under_a_mesh_equals_xla():
    from mmpo_jax.config_schema import MeshConfig
    from mmpo_jax.sharding import make_mesh

    _kernel_vs_xla("pallas_gpu", MaskSpec(), None, t=100, grads=True)  # packing none: causal only
    mesh = make_mesh(MeshConfig(data=2, fsdp=1, tensor=2), devices=jax.devices()[:4])
    _kernel_vs_xla("pallas_gpu", MaskSpec(), _two_segments(128, 40), t=128, n=4, kv=2, mesh=mesh)


def test_pallas_gpu_is_opt_in_and_refuses_what_it_cannot_do():
    from mmpo_jax.models.options import ModelOptions

    def options(attention, backend):
        return ModelOptions(param_dtype="float32", compute_dtype="bfloat16", attention=attention, backend=backend)

    gpu = options("pallas_gpu", "gpu")
    assert gpu.attention_implementation(64) == "pallas_gpu" and not gpu.interprets("pallas_gpu")
    assert options("pallas_gpu", "cpu").interprets("pallas_gpu")  # the tests' interpret mode
    assert options("auto", "gpu").attention_implementation(64) == "cudnn"  # not auto's pick
    for soft_cap, sliding, what in ((True, False, "soft-cap"), (False, True, "sliding window")):
        with pytest.raises(UserError, match=f"pallas_gpu.*{what}"):
            gpu.attention_implementation(64, soft_cap=soft_cap, sliding_window=sliding)
    with pytest.raises(UserError, match="pallas_gpu is a GPU"):
        options("pallas_gpu", "tpu").attention_implementation(64)
    q, k, v = (jnp.asarray(a) for a in qkv())
    with pytest.raises(ValueError, match="sliding window"):
        attention(q, k, v, MaskSpec(sliding_window=3), scale=0.3, implementation="pallas_gpu", interpret=True)


@pytest.mark.slow
@pytest.mark.parametrize("kernel", ["pallas_gpu", "splash"])
def test_the_device_attention_check_passes_interpreted_and_fails_without_segments(kernel, capsys):
    """benchmarks/gpu_attention_check.py (run on the device for real) on its smoke shape:
    the kernel's numerics pass, and the same kernel blind to the segments fails."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_attention_check.py"
    spec = importlib.util.spec_from_file_location("gpu_attention_check", path)
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    assert check.main(["--smoke", "--kernel", kernel]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["numerics_ok"] and out[f"{kernel}_ms"] > 0 and 0.5 < out["fill"] < 1.0
    assert check.main(["--smoke", "--kernel", kernel, "--negative-control"]) == 1
    assert json.loads(capsys.readouterr().out)["max_abs_err"]["kernel"]["out"] > 0.1


def _branched_row(t=256, lengths=((30, 1, 60), (5, 40, 2), (70, 20, 20))):
    """One row of pairs prompt | chosen | rejected (then padding): `[2, 1, T]` views and,
    per pair, the row columns of its prompt + chosen and prompt + rejected sequences."""
    from mmpo_jax.models.attention import branched_segments

    seg, branch = np.zeros((1, t), np.int32), np.zeros((1, t), np.int32)
    sequences, col = [], 0
    for s, (p, c, r) in enumerate(lengths, start=1):
        seg[0, col:col + p + c + r] = s
        branch[0, col + p:col + p + c], branch[0, col + p + c:col + p + c + r] = 1, 2
        prompt = np.arange(col, col + p)
        sequences += [np.concatenate([prompt, col + p + np.arange(c)]),
                      np.concatenate([prompt, col + p + c + np.arange(r)])]
        col += p + c + r
    return branched_segments(jnp.asarray(seg), jnp.asarray(branch)), sequences


@pytest.mark.slow
def test_branched_attention_is_each_answer_after_its_prompt_alone():
    """The shared-prompt row's attention, at each answer's tokens, equals causal attention
    over that answer's own prompt + answer sequence cut out of the row (an independent
    construction: no segment ids at all); the prompt sees only itself."""
    views, sequences = _branched_row()
    q, k, v = (jnp.asarray(a) for a in qkv(b=1, t=256, n=4, kv=2, h=16, seed=5))
    got = np.asarray(attention(q, k, v, MaskSpec(), scale=0.25, implementation="xla",
                               segments=Segments(views, branched=True)))
    for cols in sequences:
        want = attention(q[:, cols], k[:, cols], v[:, cols], MaskSpec(), scale=0.25, implementation="xla")
        np.testing.assert_allclose(got[:, cols], np.asarray(want), atol=1e-5, rtol=1e-5)
    # negative control: one view (the rejected answers see the chosen ones) differs there
    blind = np.asarray(attention(q, k, v, MaskSpec(), scale=0.25, implementation="xla",
                                 segments=Segments(views[0] // 2)))
    assert np.abs(blind[:, sequences[1]] - got[:, sequences[1]]).max() > 1e-2


@pytest.mark.parametrize("kernel", ["splash", "pallas_gpu"])
def test_branched_rows_through_the_pallas_kernels_equal_xla(kernel):
    """The two segment calls of the Pallas kernels against XLA's one union mask, forward
    and backward, grouped heads."""
    views, _ = _branched_row()
    _kernel_vs_xla(kernel, MaskSpec(), np.asarray(views).repeat(2, axis=1), t=256, n=4, kv=2, grads=True,
                   branched=True)
