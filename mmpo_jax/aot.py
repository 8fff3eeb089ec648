"""Ahead-of-time memory check: the real train step compiled for a TPU topology on this machine.

    result = aot_check(load_config("configs/tiny.yaml", []), "v5e:2x2")
    result.per_device_bytes["total"], result.fits

How: libtpu describes a TPU slice without owning one
(`jax.experimental.topologies.get_topology_desc`); its devices form the run's
`(data, fsdp, tensor)` mesh from `mesh.*`. The train state is the run's own
init under `jax.eval_shape` (`train.setup.abstract_train_state`: shapes, dtypes
and shardings, nothing of model size is allocated), the batch is
`data.batch_size` pairs of `data.max_length` tokens (the largest bucket), and
the step that `mmpo-jax train` runs (`mmpo_jax.train.step.make_train_step`: the
same jit, shardings and donation) is lowered and compiled by XLA for TPU. XLA's
memory plan of one chip is the answer:

    total = arguments + outputs - aliased (donated state) + temporaries

against the chip's HBM (`HBM_BYTES_PER_CHIP`). It fits when total <= 0.95 of
HBM: the runtime, program code and fragmentation live outside XLA's plan.

Needs libtpu at the version the installed jax pins (`pip install -e '.[aot]'`,
or `pip install "jax[tpu]==<your jax version>"`); no TPU is needed or used.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import jax
import numpy as np
from huggingface_hub import hf_hub_download
from jax.experimental import topologies
from jax.sharding import AxisType

from mmpo_jax.config_schema import RunConfig
from mmpo_jax.data.layout import layout_of
from mmpo_jax.errors import UserError
from mmpo_jax.models.decoder_config import DecoderConfig, model_config_from_init
from mmpo_jax.models.kernels import check_kernel
from mmpo_jax.models.pretrained import open_checkpoint
from mmpo_jax.paths import resolve
from mmpo_jax.sharding import MESH_AXES, resolve_mesh_shape
from mmpo_jax.train.optim import learning_rate_schedule, make_optimizer
from mmpo_jax.train.reference import reference_mode
from mmpo_jax.train.setup import abstract_train_state, model_options, step_config
from mmpo_jax.train.state import state_shardings
from mmpo_jax.train.step import check_batch_divisible, make_train_step

if TYPE_CHECKING:
    from mmpo_jax.config_schema import MeshConfig

GIB = 2**30

# HBM per chip. Cloud TPU's system-architecture pages (cloud.google.com/tpu/docs/v4,
# /v5e, /v5p, /v6e, read 2026-11): v4 "32 GiB", v5e "16 GB", v5p "95 GB", v6e "32 GB".
# Read as GiB: XLA:TPU itself (libtpu 0.0.42, in its out-of-HBM errors) counts
# 15.75 GiB available on a v5e chip and 95.74 GiB on a v5p chip after its reserve.
HBM_BYTES_PER_CHIP: dict[str, int] = {
    "v4": 32 * GIB,
    "v5e": 16 * GIB,
    "v5p": 95 * GIB,
    "v6e": 32 * GIB,
}
# The fraction of HBM XLA's plan may use: the TPU runtime, the program and
# fragmentation take the rest.
FIT_FRACTION = 0.95
# Exit status of `mmpo-jax aot-check` when the step does not fit.
EXIT_DOES_NOT_FIT = 3

# 2-D tori (v5e, v6e) and 3-D ones (v4, v5p), named as JAX/libtpu name them:
# `v5e:4x4` is 16 chips.
_TOPOLOGY = re.compile(r"^(v[0-9]+[a-z]*):([0-9]+(?:x[0-9]+){1,2})$")
_DIMS = {"v4": 3, "v5p": 3, "v5e": 2, "v6e": 2}
# libtpu wants the chips of one host as a sub-box of the slice; 2x2x1 (4 chips, as a
# v5p or v4 host has) or the whole slice when smaller. Only the program's process
# layout depends on it, not the per-chip memory plan.
_HOST_BOX = (2, 2, 1)
EXAMPLE_TOPOLOGIES = "v5e:2x2, v5e:4x4, v5e:16x16, v5p:2x2x1, v5p:2x4x4, v4:2x2x2, v6e:4x4"


@dataclass(frozen=True)
class Topology:
    """A TPU slice by JAX's name: `kind` 'v5e', `dims` (4, 4), 16 `chips`."""

    name: str
    kind: str
    dims: tuple[int, ...]

    @property
    def chips(self) -> int:
        return math.prod(self.dims)

    @property
    def hbm_bytes(self) -> int:
        return HBM_BYTES_PER_CHIP[self.kind]


def parse_topology(name: str) -> Topology:
    """`'v5p:2x2x2'` -> Topology; a UserError naming the bad part otherwise."""
    m = _TOPOLOGY.match(name.strip())
    if not m:
        raise UserError(
            f"--topology {name!r}: write KIND:AxB (v5e, v6e) or KIND:AxBxC (v4, v5p), counted in "
            f"chips, e.g. {EXAMPLE_TOPOLOGIES}"
        )
    kind, dims = m.group(1), tuple(int(d) for d in m.group(2).split("x"))
    if kind not in HBM_BYTES_PER_CHIP:
        raise UserError(
            f"--topology {name!r}: unknown TPU kind {kind!r}; known (with HBM per chip): "
            + ", ".join(f"{k} ({v // GIB} GiB)" for k, v in HBM_BYTES_PER_CHIP.items())
        )
    if len(dims) != _DIMS[kind] or min(dims) < 1:
        want = "AxB" if _DIMS[kind] == 2 else "AxBxC"
        raise UserError(f"--topology {name!r}: a {kind} slice is {want} chips (e.g. {kind}:"
                        f"{'4x4' if _DIMS[kind] == 2 else '2x2x2'})")
    return Topology(name=f"{kind}:{'x'.join(map(str, dims))}", kind=kind, dims=dims)


def libtpu_version() -> str | None:
    """The installed libtpu's version, or None when it is not installed."""
    if importlib.util.find_spec("libtpu") is None:
        return None
    try:
        return importlib.metadata.version("libtpu")
    except importlib.metadata.PackageNotFoundError:  # a nightly under another name
        return "unknown"


def _need_libtpu() -> str:
    version = libtpu_version()
    if version is None:
        raise UserError(
            "aot-check compiles for TPU with libtpu, which is not installed: pip install -e '.[aot]' "
            f"(or pip install \"jax[tpu]=={jax.__version__}\", which pins the libtpu of your jax)"
        )
    return version


@contextlib.contextmanager
def _quiet_libtpu_env() -> Iterator[None]:
    """libtpu's start-up, without a TPU: it looks for a TPU VM's metadata and prints
    errors when it finds none (these values answer it and change nothing else: the
    topology is given explicitly), and it takes /tmp/libtpu_lockfile, so a second
    process (another aot-check, any `import jax` that tried the TPU backend) would
    fail; a compile opens no TPU, so several may load libtpu at once. Set only while
    libtpu starts: left set, TPU_ACCELERATOR_TYPE would make `mmpo_jax.distributed`
    think this machine is a TPU VM. Left alone on a TPU VM and where the user set them."""
    on_tpu_vm = Path("/dev/accel0").exists() or Path("/dev/vfio").exists()
    values = {} if on_tpu_vm else {"TPU_WORKER_HOSTNAMES": "localhost", "TPU_ACCELERATOR_TYPE": "v5litepod-1",
                                   "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
    added = [k for k in values if k not in os.environ]
    os.environ.update({k: values[k] for k in added})
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def topology_devices(topo: Topology) -> list:
    """The TPU devices of `topo`, one per chip (v4 and v5p as megacore: one device per chip)."""
    libtpu = _need_libtpu()
    dims3 = (*topo.dims, 1) if len(topo.dims) == 2 else topo.dims
    host = tuple(min(d, h) for d, h in zip(dims3, _HOST_BOX))
    # v4 and v5p chips have two TensorCores; JAX on a TPU VM runs them as one
    # device ("megacore"), so compile for that.
    chip_config = "megacore" if topo.kind in ("v4", "v5p") else "default"
    try:
        with _quiet_libtpu_env():
            desc = topologies.get_topology_desc(
                platform="tpu", topology_name=topo.name, chip_config_name=chip_config,
                chips_per_host_bounds=host, num_slices=1,
            )
    except Exception as err:  # libtpu's errors are RuntimeError / XlaRuntimeError
        raise UserError(
            f"--topology {topo.name}: libtpu {libtpu} could not describe it ({str(err).splitlines()[0][:300]}). "
            f"Check the shape is a real {topo.kind} slice (e.g. {EXAMPLE_TOPOLOGIES}) and that libtpu "
            f"matches jax {jax.__version__} (pip install \"jax[tpu]=={jax.__version__}\")"
        ) from None
    devices = list(desc.devices)
    if len(devices) != topo.chips:  # a libtpu that splits chips into cores
        raise UserError(f"--topology {topo.name}: libtpu gave {len(devices)} devices for {topo.chips} chips; "
                        "per-chip numbers would be per core. Use a libtpu matching your jax")
    return devices


def topology_mesh(mesh_cfg: MeshConfig, devices: list) -> jax.sharding.Mesh:
    """The `(data, fsdp, tensor)` mesh of `mesh.*` over `devices` (a -1 axis takes the rest).

    Not `mmpo_jax.sharding.make_mesh`: that one builds over `jax.devices()` (this
    machine's CPUs) when the counts happen to match.
    """
    shape = resolve_mesh_shape(mesh_cfg, len(devices))
    # jax.make_mesh orders the devices for the physical torus, as on a TPU VM.
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


# --------------------------------------------------------------------------- #
# The model's architecture without its weights
# --------------------------------------------------------------------------- #
def model_architecture(cfg: RunConfig) -> DecoderConfig:
    """The `DecoderConfig` of `model.path` (its config.json or GGUF metadata, no weights),
    or of `model.init.*` when `model.path` is ""."""
    spec = cfg.model.path
    if not spec:
        return model_config_from_init(cfg.model.init)
    text = resolve(spec)
    local = Path(text).expanduser()
    if local.is_dir():
        return DecoderConfig.from_hf_dict(_read_json(local / "config.json", spec))
    if local.is_file():
        return DecoderConfig.from_hf_dict(open_checkpoint(local).hf_config)  # GGUF: metadata only
    return DecoderConfig.from_hf_dict(_read_json(_hub_config(text), spec))


def _read_json(path: Path, spec: str) -> dict:
    if not path.is_file():
        raise UserError(f"model.path={spec!r} has no config.json at {path}; pass an HF model directory, "
                        "a .gguf file, or model.path=\"\" with the shapes as model.init.* overrides")
    return json.loads(path.read_text())


def _hub_config(repo_id: str) -> Path:
    """Only `config.json` of a hub model (from the HF cache, or downloaded): a few KB."""
    try:
        return Path(hf_hub_download(repo_id, "config.json"))
    except Exception as err:  # offline, gated, unknown repo: all say the same thing here
        raise UserError(
            f"model.path={repo_id!r}: cannot read its config.json ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:200] if str(err) else ''}). aot-check needs only the architecture: "
            "pass a local directory holding the config.json, or model.path=\"\" with the shapes as overrides "
            "(model.init.hidden_size=... model.init.num_hidden_layers=... , see tpu_scripts/README.md)"
        ) from None


def target_options(cfg: RunConfig) -> Any:
    """`ModelOptions` of `cfg` as a TPU run resolves them (compute_dtype auto = bfloat16);
    a `UserError` for an attention kernel a TPU run refuses before any architecture is read
    (`mmpo_jax.models.kernels.check_kernel`; the model's own refusals come as it is built)."""
    check_kernel(cfg.model.attention, cfg.model.compute_dtype, layout_of(cfg.data.packing).segments, "tpu")
    return model_options(cfg, backend="tpu")


# --------------------------------------------------------------------------- #
# Compile and read the plan
# --------------------------------------------------------------------------- #
def per_device_bytes(compiled: Any) -> dict[str, int]:
    """XLA's plan of one device: `arguments`, `outputs`, `temporaries`, `aliased`
    (outputs written into donated arguments), `total` = arguments + outputs - aliased +
    temporaries, and `generated_code` (the program; not in `total`)."""
    stats = compiled.memory_analysis()
    if stats is None:
        raise UserError("XLA gave no memory analysis for this compile; use a libtpu matching your jax")
    plan = {
        "arguments": int(stats.argument_size_in_bytes),
        "outputs": int(stats.output_size_in_bytes),
        "temporaries": int(stats.temp_size_in_bytes),
        "aliased": int(stats.alias_size_in_bytes),
    }
    plan["total"] = plan["arguments"] + plan["outputs"] - plan["aliased"] + plan["temporaries"]
    plan["generated_code"] = int(getattr(stats, "generated_code_size_in_bytes", 0) or 0)
    return plan


def per_device_array_bytes(tree: Any) -> int:
    """Bytes one device holds of the sharded ShapeDtypeStructs of `tree` (its shards).

    For the state and batch it is XLA's `arguments` before TPU tile padding, known
    without compiling (what a refused compile still lets us say): Llama-3-8B on
    v5p:2x2x1 28,108,742,680 here against 28,108,745,216 by XLA; SmolLM2-135M 13%
    under XLA's, its small dimensions padded to (8, 128) tiles.
    """
    return int(sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree)))


# XLA:TPU refuses at compile time a program that cannot fit the chip's HBM, in
# one of two messages (sizes in binary units: 95.74G = 95.74 GiB):
#   Ran out of memory on HBM, the total memory required for HLO temporaries (1.26T)
#   exceeds available HBM (95.74G).
#   Ran out of memory in memory space hbm. Used 21.95G of 15.48G hbm. ...
_REFUSALS = (
    re.compile(r"required for HLO temporaries \(([0-9.]+)([KMGTP]?)\) exceeds available HBM \(([0-9.]+)([KMGTP]?)\)"),
    re.compile(r"Used ([0-9.]+)([KMGTP]?) of ([0-9.]+)([KMGTP]?) hbm"),
)
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40, "P": 2**50}


def parse_hbm_refusal(message: str) -> dict[str, Any] | None:
    """`{"message", "required_bytes", "available_bytes"}` from XLA's out-of-HBM error
    (the byte counts as XLA rounds them; None where the message does not say), or None
    when `message` is not one."""
    if "RESOURCE_EXHAUSTED" not in message or "hbm" not in message.lower():
        return None
    out: dict[str, Any] = {"message": message.strip().splitlines()[0][:500],
                           "required_bytes": None, "available_bytes": None}
    for pattern in _REFUSALS:
        m = pattern.search(message)
        if m:
            out["required_bytes"] = int(float(m.group(1)) * _UNITS[m.group(2)])
            out["available_bytes"] = int(float(m.group(3)) * _UNITS[m.group(4)])
            break
    return out


def _count(tree: Any) -> int:
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))


@dataclass
class AotResult:
    """One compile's answer (`to_json()` is what `--json` prints).

    `per_device_bytes` is XLA's plan, None when XLA refused the program for want of
    HBM (`xla_refused` then holds its message and the sizes it names);
    `state_bytes_per_device` (parameters, optimizer state, reference, batch shards)
    comes from the shapes and is there either way.
    """

    topology: str
    chips: int
    device_kind: str
    mesh: dict[str, int]
    model: dict[str, Any]
    batch: dict[str, Any]
    per_device_bytes: dict[str, int] | None
    state_bytes_per_device: int
    device_memory_bytes: int
    fit_fraction: float
    fits: bool
    compile_seconds: float
    lower_seconds: float
    xla_refused: dict[str, Any] | None = None
    versions: dict[str, str | None] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _compile(lowered: Any) -> tuple[dict[str, int] | None, dict[str, Any] | None]:
    """`(plan, None)`, or `(None, refusal)` when XLA refuses the program for want of HBM."""
    try:
        return per_device_bytes(lowered.compile()), None
    except Exception as err:  # XlaRuntimeError; anything but an HBM refusal is a real failure
        refusal = parse_hbm_refusal(str(err))
        if refusal is None:
            raise
        return None, refusal


def aot_check(cfg: RunConfig, topology: str) -> AotResult:
    """Compiles `cfg`'s train step for the TPU slice `topology` and reads its memory plan.

    The batch is `data.batch_size` pairs x 2 x `data.max_length` tokens (the largest
    bucket a run pads to; packed: a row of `data.pack_length` per pair, the largest row
    bucket), split over `mesh.data` x `mesh.fsdp`. It fits when XLA
    compiles it and its plan's total is at most `FIT_FRACTION` of HBM.
    """
    topo = parse_topology(topology)
    options = target_options(cfg)  # a kernel a TPU run refuses stops before libtpu is opened
    devices = topology_devices(topo)
    mesh = topology_mesh(cfg.mesh, devices)
    check_batch_divisible(cfg.data.batch_size, cfg.optim.grad_accum, mesh)
    arch = model_architecture(cfg)
    # train.num_epochs needs the data's size; the length only scales the learning rate, which
    # changes no compiled shape or memory
    total_steps = cfg.train.max_steps or 1
    optimizer = make_optimizer(cfg.optim, total_steps)
    scfg = step_config(cfg, learning_rate_schedule(cfg.optim, total_steps), options)
    mode = reference_mode(cfg.model.reference)
    sdef, state = abstract_train_state(arch, options, optimizer, mesh, reference_mode=mode,
                                       seed=cfg.train.seed, init_scale=cfg.model.init.init_scale)
    # packed: the largest row bucket, a row per pair (every block's pairs in rows of their own)
    rows = (cfg.data.batch_size, cfg.data.pack_length or 0)
    batch = layout_of(cfg.data.packing).abstract(cfg.data.batch_size, cfg.data.max_length, mesh,
                                                 mode, rows)
    step = make_train_step(sdef, scfg, optimizer, mesh, state_shardings(state), batch)
    t0 = time.perf_counter()
    lowered = step.lower(state, batch)
    lower_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    plan, refused = _compile(lowered)
    compile_s = time.perf_counter() - t0
    hbm = topo.hbm_bytes
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    return AotResult(
        topology=topo.name, chips=topo.chips, device_kind=devices[0].device_kind,
        mesh={k: int(v) for k, v in mesh.shape.items()},
        model={
            "path": cfg.model.path, "hidden_size": arch.hidden_size, "layers": arch.num_hidden_layers,
            "vocab_size": arch.vocab_size,
            "params": _count(state.trainable) + _count(state.frozen),
            "trainable_params": _count(state.trainable),
            "lora_rank": cfg.model.lora.rank, "reference": mode.name,
            "param_dtype": np.dtype(options.param_dtype).name,
            "compute_dtype": np.dtype(options.compute_dtype).name, "remat": options.remat,
            "attention": options.model_choice(arch).kernel,
            # Pallas kernels in the program (splash attention's forward and backward)
            "pallas_calls": lowered.as_text().count("tpu_custom_call"),
        },
        batch={
            "pairs": cfg.data.batch_size, "seq": cfg.data.max_length, "grad_accum": cfg.optim.grad_accum,
            "packing": cfg.data.packing, "pack_length": cfg.data.pack_length,
            "pairs_per_device_per_micro_batch": cfg.data.batch_size // cfg.optim.grad_accum // shards,
        },
        per_device_bytes=plan, state_bytes_per_device=per_device_array_bytes((state, batch)),
        device_memory_bytes=hbm, fit_fraction=FIT_FRACTION,
        fits=plan is not None and plan["total"] <= FIT_FRACTION * hbm,
        compile_seconds=round(compile_s, 2), lower_seconds=round(lower_s, 2), xla_refused=refused,
        versions={"jax": jax.__version__, "libtpu": libtpu_version()},
    )


def format_table(r: AotResult) -> str:
    """The human-readable report: one line per part of the plan, then the verdict."""
    p = r.per_device_bytes
    # MiB for plans under a GiB (the tiny configs), so the numbers stay readable
    big = (p["total"] if p else r.state_bytes_per_device) >= GIB
    unit, scale = ("GiB", GIB) if big else ("MiB", 2**20)
    size = lambda n: f"{n / scale:10.3f} {unit}"  # noqa: E731
    m = r.model
    kind = f"LoRA r{m['lora_rank']}" if m["lora_rank"] else "full fine-tuning"
    limit = r.fit_fraction * r.device_memory_bytes
    lines = [
        f"aot-check: {r.topology} ({r.chips} x {r.device_kind}), mesh "
        + " x ".join(f"{k}={v}" for k, v in r.mesh.items()),
        f"  model: {m['params'] / 1e6:,.1f}M params ({m['trainable_params'] / 1e6:,.2f}M trained, {kind}), "
        f"{m['param_dtype']} params, {m['compute_dtype']} compute, remat {m['remat']}, reference {m['reference']}, "
        f"attention {m.get('attention', '?')}",
        f"  batch: {r.batch['pairs']} pairs x 2 x {r.batch['seq']} tokens, grad_accum {r.batch['grad_accum']} "
        f"({r.batch['pairs_per_device_per_micro_batch']} pairs per device per micro-batch)",
    ]
    if p is not None:
        lines += [
            "  per-device memory (XLA plan):",
            f"    arguments    {size(p['arguments'])}",
            f"    outputs      {size(p['outputs'])}",
            f"    aliased    - {size(p['aliased'])}",
            f"    temporaries  {size(p['temporaries'])}",
            f"    total        {size(p['total'])}",
        ]
    else:
        refused = r.xla_refused or {}
        lines += [
            "  per-device memory: XLA refused to compile the step for want of HBM:",
            f"    {refused.get('message', '')}",
            f"    state and batch shards (from their shapes) {size(r.state_bytes_per_device).strip()}",
        ]
    lines.append(f"  device memory  {r.device_memory_bytes / GIB:10.3f} GiB ({r.topology.split(':')[0]} HBM); "
                 f"limit {r.fit_fraction:.0%} = {limit / GIB:.3f} GiB")
    share = f" ({p['total'] / r.device_memory_bytes:.1%} of HBM)" if p else ""
    lines.append(f"  {'FITS' if r.fits else 'DOES NOT FIT'}{share}; compiled in {r.compile_seconds:.1f} s "
                 f"(lowered in {r.lower_seconds:.1f} s)")
    return "\n".join(lines)
