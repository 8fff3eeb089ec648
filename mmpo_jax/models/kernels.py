"""Which attention kernel runs: one capability table, one choice at build time.

`KERNELS` holds a `Kernel` row per `model.attention` kernel: the backends it is compiled
for, those where it runs only in Pallas interpret mode (exact and slow: the tests), and
what it takes (the segment ids of packed rows, a sliding window, a logit soft-cap, its
compute dtypes and head dims). A new kernel (an MoE grouped matmul, ring attention) adds
a row.

`choose_kernel(requested, needs, backend)` turns `model.attention` (`auto` included)
into the kernel a model runs, once, when it is built (`ModelOptions.for_model`); a
combination that cannot run raises a `UserError` naming both keys and the fix, so it
stops at start rather than at the first step. `check_kernel` applies the refusals that
need no checkpoint (kernel x backend x layout x compute dtype): `mmpo-jax config
--backend` and `aot-check` run it before any model is read.

Free of jax, so the config command can read it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from mmpo_jax.config_settle import settled_compute_dtype
from mmpo_jax.errors import UserError

BACKENDS = ("cpu", "gpu", "tpu")
KernelName = Literal["xla", "cudnn", "splash", "pallas_gpu"]
# the dtypes a half-precision kernel takes (`model.compute_dtype` offers bfloat16)
HALF = ("bfloat16", "float16")


@dataclass(frozen=True)
class Kernel:
    """One attention kernel and what it takes.

    backends: where it is compiled; interpreted: where it runs only in Pallas interpret
    mode (tests; elsewhere it is refused). segments / sliding_window / soft_cap: whether it
    takes packed rows' segment ids, a sliding window, a logit soft-cap; bidirectional:
    whether it attends without the causal mask (no model here asks it). compute_dtypes:
    the compute dtypes it takes (None: any). head_dim_multiple / head_dim_max: the head
    dims it takes (None: any); auto_head_dim_max: the largest `auto` picks it for, where
    the kernel's limit depends on the device."""

    name: KernelName
    what: str
    backends: tuple[str, ...]
    interpreted: tuple[str, ...] = ()
    segments: bool = False
    sliding_window: bool = False
    soft_cap: bool = False
    bidirectional: bool = True
    compute_dtypes: tuple[str, ...] | None = None
    head_dim_multiple: int = 1
    head_dim_max: int | None = None
    auto_head_dim_max: int | None = None

    def runs_on(self, backend: str) -> bool:
        return backend in self.backends or backend in self.interpreted

    def interprets(self, backend: str) -> bool:
        """Whether it runs in Pallas interpret mode on `backend` (off the one it is written for)."""
        return backend in self.interpreted

    def lacks_masks(self, *, segments: bool, sliding_window: bool, soft_cap: bool, causal: bool = True
                    ) -> list[str]:
        """What it does not take among these masks, each a phrase naming the model's or the
        layout's key (empty: it takes them all)."""
        asked = ((soft_cap and not self.soft_cap,
                  "takes no attention logit soft-cap (this model's attn_logit_softcapping, Gemma 2)"),
                 (sliding_window and not self.sliding_window, "takes no sliding window (this model's sliding_window)"),
                 (segments and not self.segments,
                  "takes no segment ids, which a packed data.packing (packed, shared_prompt) hands the model"),
                 (not causal and not self.bidirectional, "is causal only"))
        return [phrase for missing, phrase in asked if missing]


KERNELS: dict[str, Kernel] = {k.name: k for k in (
    # jax.nn.dot_product_attention's XLA path (and the explicit-scores path for a soft-cap);
    # segment ids become a dense [T, T] mask per row
    Kernel("xla", "XLA's attention", BACKENDS, segments=True, sliding_window=True, soft_cap=True),
    # cuDNN's fused flash attention; head_dim up to 256 needs Hopper or later, so auto
    # keeps it to the 128 every GPU takes
    Kernel("cudnn", "cuDNN's fused attention", ("gpu",), sliding_window=True, compute_dtypes=HALF,
           head_dim_multiple=8, head_dim_max=256, auto_head_dim_max=128),
    Kernel("splash", "Pallas's TPU splash attention", ("tpu",), interpreted=("cpu",),
           segments=True, sliding_window=True, soft_cap=True),
    Kernel("pallas_gpu", "Pallas's Triton flash attention for GPUs", ("gpu",),
           interpreted=("cpu",), segments=True, bidirectional=False),
)}
# `auto`: the first of these compiled for the backend that takes what the model and layout
# need (xla takes everything); pallas_gpu stays opt-in until it is measured on a GPU
AUTO_PREFERENCE = ("splash", "cudnn", "xla")


@dataclass(frozen=True)
class Needs:
    """What a model and its batch layout ask of a kernel.

    head_dim: the model's (None: not known yet, no checkpoint read); soft_cap /
    sliding_window: the model caps its attention logits (Gemma 2) / some layers attend
    within a window; segments: the layout hands the model segment ids (packed rows);
    compute_dtype: `model.compute_dtype` settled for the backend ("float32", ...)."""

    compute_dtype: str
    segments: bool = False
    head_dim: int | None = None
    soft_cap: bool = False
    sliding_window: bool = False


@dataclass(frozen=True)
class KernelChoice:
    """The kernel a model runs, and why `auto` picked it (None for an explicit choice)."""

    kernel: KernelName
    reason: str | None = None

    def start_line(self) -> str | None:
        """The line a run prints at start for `auto`'s choice (None: chosen explicitly)."""
        return None if self.reason is None else f"attention: model.attention=auto -> {self.kernel} ({self.reason})"


def lacks(kernel: Kernel, needs: Needs, backend: str, for_auto: bool = False) -> list[str]:
    """What stops `kernel` from running `needs` on `backend`, each a phrase naming its key
    (empty: it runs). `for_auto`: within `auto`'s limits (compiled, head dims every device takes)."""
    problems = []
    if not (backend in kernel.backends if for_auto else kernel.runs_on(backend)):
        where = "/".join(b.upper() for b in kernel.backends)
        also = f"; interpreted, slowly, on {'/'.join(kernel.interpreted)} for tests" if kernel.interpreted else ""
        problems.append(f"is a {where} kernel ({kernel.what}{also}), not one for {backend}")
    problems += kernel.lacks_masks(segments=needs.segments, sliding_window=needs.sliding_window,
                                   soft_cap=needs.soft_cap)
    if kernel.compute_dtypes is not None and needs.compute_dtype not in kernel.compute_dtypes:
        problems.append(f"needs model.compute_dtype {' or '.join(kernel.compute_dtypes)}, not {needs.compute_dtype}")
    top = kernel.auto_head_dim_max if for_auto and kernel.auto_head_dim_max is not None else kernel.head_dim_max
    hd = needs.head_dim
    if hd is not None and (hd % kernel.head_dim_multiple or (top is not None and hd > top)):
        limit = "" if top is None else f" up to {top}"
        problems.append(f"takes a head_dim that is a multiple of {kernel.head_dim_multiple}{limit}, "
                        f"not this model's {hd}")
    return problems


def _refusal(requested: str, needs: Needs, backend: str, problems: list[str]) -> str:
    """The UserError text for `model.attention=requested`: what it lacks, then each way out."""
    # the ways out: kernels compiled here (not interpreted) that take it all
    others = [name for name, k in KERNELS.items() if name != requested and not lacks(k, needs, backend, True)]
    fixes = [f"set model.attention to {', '.join(['auto', *others[:-1]])}"
             + (f" or {others[-1]}" if others else "")]
    kernel = KERNELS[requested]
    if needs.segments and not lacks(kernel, replace(needs, segments=False), backend):
        fixes.append("data.packing=none")
    if kernel.compute_dtypes and not lacks(kernel, replace(needs, compute_dtype=kernel.compute_dtypes[0]), backend):
        fixes.append(f"model.compute_dtype={kernel.compute_dtypes[0]}")
    return f"model.attention={requested} {'; it '.join(problems)}; {', or '.join(fixes)}"


def _auto(needs: Needs, backend: str) -> KernelChoice:
    """`auto`'s pick on `backend` and why, from the table and `AUTO_PREFERENCE`."""
    passed = []
    for name in AUTO_PREFERENCE:
        kernel = KERNELS[name]
        problems = lacks(kernel, needs, backend, for_auto=True)
        if not problems:
            break
        if backend in kernel.backends:  # a kernel of another backend is no news
            passed.append(f"{name} {problems[0]}")
    else:  # xla takes everything: the table would have to lose it
        raise AssertionError(f"no kernel for {needs} on {backend}")
    reason = "; ".join(passed) if passed else f"{kernel.what}, the first choice on {backend.upper()}"
    opt_in = [n for n, k in KERNELS.items() if n not in AUTO_PREFERENCE and not lacks(k, needs, backend, True)]
    if passed and opt_in:
        reason += f"; model.attention={' or '.join(opt_in)} runs here too"
    return KernelChoice(kernel.name, reason)


def choose_kernel(requested: str, needs: Needs, backend: str) -> KernelChoice:
    """The kernel `model.attention=requested` runs for `needs` on `backend` ("cpu",
    "gpu", "tpu"): `auto`'s pick with its reason, or the requested kernel; a `UserError`
    naming the keys and the fix where it cannot run."""
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r}: one of {BACKENDS}")
    if requested == "auto":
        return _auto(needs, backend)
    if requested not in KERNELS:
        raise UserError(f"model.attention={requested!r} is not supported; choose one of auto, {', '.join(KERNELS)}")
    problems = lacks(KERNELS[requested], needs, backend)
    if problems:
        raise UserError(_refusal(requested, needs, backend, problems))
    return KernelChoice(KERNELS[requested].name)


def check_kernel(requested: str, compute_dtype: str, segments: bool, backend: str | None) -> None:
    """The refusals that need no checkpoint: `model.attention=requested` with
    `model.compute_dtype` (auto included) and a layout handing segment ids or not, on
    `backend`; with None, refused only where none of the kernel's own backends runs it."""
    if requested == "auto":
        return
    errors = []
    for where in (backend,) if backend is not None else KERNELS[requested].backends:
        try:
            choose_kernel(requested, Needs(settled_compute_dtype(compute_dtype, where), segments), where)
            return
        except UserError as err:
            errors.append(err)
    raise errors[0]
