"""From a run config to what the step needs: mesh, policy, reference, optimizer, state.

`build_trainer(cfg, ...)` is the one place that turns `model.*`, `optim.*`,
`loss.*` and `mesh.*` into a `Trainer`; `mmpo-jax train`, `eval`, `compare --step`
and the benchmarks all go through it, so they run the same step, and `aot-check`
compiles the state of the same `build_model` + `create_state` under `jax.eval_shape`.
`build_policy` is its first part (the initial policy alone, for `generate`), and
`initial_reference` loads a run's starting reference again for the modes whose state
keeps none.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import jax
import numpy as np
import optax

from mmpo_jax.config_schema import RunConfig
from mmpo_jax.errors import UserError
from mmpo_jax.models.build import build_model
from mmpo_jax.models.decoder_config import DecoderConfig, model_config_from_init
from mmpo_jax.models.options import ModelOptions
from mmpo_jax.sharding import make_mesh
from mmpo_jax.train.optim import learning_rate_schedule, make_optimizer
from mmpo_jax.train.reference import reference_mode
from mmpo_jax.train.state import StateDef, TrainState, create_state, place_abstract_state, state_shardings
from mmpo_jax.train.step import (StepConfig, batch_shardings, check_batch_divisible, make_eval_step,
                                 make_train_step)

if TYPE_CHECKING:
    from mmpo_jax.models.decoder import Decoder
    from mmpo_jax.data.batches import PackSpec, PreferenceBatch
    from mmpo_jax.data.packing import PackedBatch


def model_options(cfg: RunConfig, backend: str | None = None) -> ModelOptions:
    """The model options of `cfg` for `backend` (None: this process's JAX backend)."""
    return ModelOptions.from_config(cfg.model, backend)


def load_model(cfg: RunConfig, path: str, options: ModelOptions, mesh: jax.sharding.Mesh) -> tuple[Decoder, DecoderConfig]:
    """`(model, architecture)`: the checkpoint at `path`, or a random init when `path` is ""."""
    if path:
        from mmpo_jax.models.pretrained import load_checkpoint

        model, arch, _ = load_checkpoint(path, options, mesh=mesh, with_tokenizer=False)
        return model, arch
    arch = model_config_from_init(cfg.model.init)
    model = build_model(arch, options, mesh=mesh, seed=cfg.train.seed, init_scale=cfg.model.init.init_scale)
    return model, arch


def build_policy(cfg: RunConfig, mesh: jax.sharding.Mesh | None = None) -> tuple[Decoder, DecoderConfig, ModelOptions]:
    """`(model, architecture, options)`: the run's initial policy alone, as `build_trainer`
    makes it (no optimizer or reference: what `generate` of a config needs)."""
    mesh = make_mesh(cfg.mesh) if mesh is None else mesh
    options = model_options(cfg)
    model, arch = load_model(cfg, cfg.model.path, options, mesh)
    return model, arch, options


def load_reference(cfg: RunConfig, options: ModelOptions, mesh: jax.sharding.Mesh,
                   policy_arch: DecoderConfig) -> Decoder | None:
    """The model of `model.reference_path` (None when unset: the initial policy is the reference).

    Loaded with the policy's options (LoRA adapters included, B = 0) so that its
    parameters have the policy's structure; the architecture must be the policy's.
    """
    if not cfg.model.reference_path:
        return None
    model, arch = load_model(cfg, cfg.model.reference_path, options, mesh)
    if arch != policy_arch:
        diff = [f.name for f in dataclasses.fields(arch) if getattr(arch, f.name) != getattr(policy_arch, f.name)]
        raise UserError(
            f"model.reference_path={cfg.model.reference_path!r} has another architecture than the policy "
            f"(differs in {', '.join(diff)}); the reference must be a checkpoint of the same model"
        )
    return model


def check_vocab(tokenizer: Any, arch: DecoderConfig, cfg: RunConfig) -> None:
    """Every token id of `data.tokenizer` must index the model's embedding."""
    n = len(tokenizer)
    if n > arch.vocab_size:
        where = f"model.path={cfg.model.path!r}" if cfg.model.path else f"model.init.vocab_size={arch.vocab_size}"
        raise UserError(
            f"data.tokenizer={cfg.data.tokenizer!r} has {n} tokens but the model's vocabulary has "
            f"{arch.vocab_size} ({where}); use the model's own tokenizer or a larger vocabulary"
        )


def check_context(arch: DecoderConfig, cfg: RunConfig) -> None:
    """A sequence's positions (prompt + answer, up to `data.max_length` in every layout: packed
    rows restart them per sequence) must lie within the model's context."""
    limit = arch.context_length
    if cfg.data.max_length <= limit:
        return
    where = f"model.path={cfg.model.path!r}" if cfg.model.path else "model.init"
    scaling = (f", with {arch.rope_type} RoPE scaling {arch.rope_scaling} over max_position_embeddings="
               f"{arch.max_position_embeddings}" if arch.rope_scaling else "")
    raise UserError(
        f"data.max_length={cfg.data.max_length} is longer than the model's context: {where} reads "
        f"{limit} positions (max_position_embeddings={arch.max_position_embeddings}{scaling}); set "
        f"data.max_length <= {limit}"
    )


def step_config(cfg: RunConfig, schedule: Callable[[jax.Array], jax.Array], options: ModelOptions) -> StepConfig:
    return StepConfig(
        loss=cfg.loss,
        grad_accum=cfg.optim.grad_accum,
        logprob_chunk=cfg.model.logprob_chunk,
        schedule=schedule,
        dropout=options.uses_dropout,
        reference_sync=((cfg.model.reference_sync_steps, cfg.model.reference_mixup_alpha)
                        if cfg.model.sync_reference else None),
    )


@dataclass
class Trainer:
    """A run's model state and its jitted steps (`train_step(state, batch)`, `eval_step`).

    `train_step` / `eval_step` compile once per batch shape (one per bucket length).
    """

    cfg: RunConfig
    mesh: jax.sharding.Mesh
    arch: DecoderConfig
    options: ModelOptions
    sdef: StateDef
    state: TrainState
    optimizer: optax.GradientTransformation
    scfg: StepConfig
    train_step: Callable
    eval_step: Callable
    packing: PackSpec | None = None  # `pack_spec(cfg, mesh)`: how the batches are packed


def build_trainer(cfg: RunConfig, mesh: jax.sharding.Mesh | None = None,
                  devices: list | None = None) -> Trainer:
    """The initial state and jitted steps of `cfg` on `mesh` (default: from `mesh.*`)."""
    mesh = make_mesh(cfg.mesh, devices=devices) if mesh is None else mesh
    check_batch_divisible(cfg.data.batch_size, cfg.optim.grad_accum, mesh)
    policy, arch, options = build_policy(cfg, mesh)
    check_context(arch, cfg)
    mode = reference_mode(cfg.model.reference)
    # precomputed: the reference pass loads its model when it runs (initial_reference),
    # so a cached table needs none and the trainer holds no second copy
    reference = load_reference(cfg, options, mesh, arch) if mode.stores_weights else None
    # train.num_epochs still unresolved: a trainer that never steps (eval of a config); the
    # length only scales the learning rate, no compiled shape. A run resolves it first.
    total = cfg.train.max_steps or 1
    optimizer = make_optimizer(cfg.optim, total)
    schedule = learning_rate_schedule(cfg.optim, total)
    sdef, state = create_state(
        policy, optimizer, lora=options.lora is not None, reference_mode=mode.name,
        reference_model=reference, seed=cfg.train.seed, mesh=mesh,
    )
    scfg = step_config(cfg, schedule, options)
    example = example_batch(cfg, mode.name)
    shardings = state_shardings(state)
    n = sum(x.size for x in jax.tree.leaves((state.trainable, state.frozen)))
    return Trainer(
        cfg=cfg, mesh=mesh, arch=arch, options=options, sdef=sdef, state=state, optimizer=optimizer,
        scfg=scfg, train_step=make_train_step(sdef, scfg, optimizer, mesh, shardings, example, n),
        eval_step=make_eval_step(sdef, scfg, mesh, shardings, example, n), packing=pack_spec(cfg, mesh),
    )


def initial_reference(trainer: Trainer) -> Decoder:
    """The run's reference as it was before training, loaded anew from the config:
    `model.reference_path` where the mode reads one (separate, precomputed), else the
    policy's starting point (`model.path`, or the seeded random init, which loads to the
    same weights every time). Loaded with the run's options, so LoRA adapters exist with
    B = 0 and add nothing. For the modes that keep no reference model: the precomputed
    reference pass, and the win rate's comparison model."""
    cfg = trainer.cfg
    mode = reference_mode(cfg.model.reference)
    if cfg.model.reference_path and (mode.stores_weights or mode.precomputed):
        reference = load_reference(cfg, trainer.options, trainer.mesh, trainer.arch)
        assert reference is not None  # a reference_path always loads one
        return reference
    model, _ = load_model(cfg, cfg.model.path, trainer.options, trainer.mesh)
    return model


BATCH_KEYS = ("input_ids", "loss_mask", "pair_mask")
# a packed batch's rows and the map back to its pairs (mmpo_jax/data/packing.py)
PACKED_KEYS = (*BATCH_KEYS, "segment_ids", "positions", "sources", "token_index", "attention_mask")
SHARED_KEYS = (*PACKED_KEYS, "branches")  # data.packing: shared_prompt


def pack_spec(cfg: RunConfig, mesh: jax.sharding.Mesh) -> PackSpec | None:
    """How `cfg`'s batches are packed on `mesh` (None: `data.packing: none`)."""
    if cfg.data.packing == "none":
        return None
    # imported here: a step built on arrays of its own (benchmarks/, the GPU image) loads no data code
    from mmpo_jax.data.batches import PackSpec

    return PackSpec.for_data(cfg.data, mesh.shape["data"] * mesh.shape["fsdp"], cfg.optim.grad_accum)


def run_reference(trainer: Trainer) -> Decoder | None:
    """The run's reference model: the one its state holds (separate, lora_base), the
    initial one loaded again for `precomputed` (its state keeps only log-probs), None
    for `none`."""
    from mmpo_jax.train.reference import held_model

    held = held_model(trainer)
    if held is None and reference_mode(trainer.sdef.reference_mode).precomputed:
        return initial_reference(trainer)
    return held


def batch_shapes(pairs: int, seq: int, mode: str, packed: tuple[int, int] | None = None,
                 shared: bool = False) -> dict[str, tuple[tuple[int, ...], Any]]:
    """The step's batch, key -> (shape, dtype): `input_ids`, `loss_mask` `[pairs, 2, seq]`
    int32, `pair_mask` `[pairs]` int32, and the keys of reference mode `mode`
    (`precomputed`: `ref_logps` `[pairs, 2]` float32), as `device_batch` builds them.
    `packed` `(rows, pack_length)`: a packed batch (`PACKED_KEYS`), its rows
    `[rows, pack_length]` and its pair-major arrays `seq` wide; `shared`: a shared-prompt
    one (`SHARED_KEYS`)."""
    shapes: dict[str, tuple[tuple[int, ...], Any]] = {
        "input_ids": ((pairs, 2, seq), np.int32),
        "loss_mask": ((pairs, 2, seq), np.int32),
        "pair_mask": ((pairs,), np.int32),
    }
    if packed is not None:
        shapes["input_ids"] = (packed, np.int32)
        shapes.update({"segment_ids": (packed, np.int32), "positions": (packed, np.int32),
                       "sources": (packed, np.int32), "token_index": ((pairs, 2, seq), np.int32),
                       "attention_mask": ((pairs, 2, seq), np.int32)})
        if shared:
            shapes["branches"] = (packed, np.int32)
    for key in reference_mode(mode).batch_keys:
        shapes[key] = ((pairs, 2), np.float32)
    return shapes


def example_batch(cfg: RunConfig, mode: str) -> dict[str, np.ndarray]:
    """The keys and dtypes of the step's batch (shapes do not matter: only the shardings are read)."""
    packed = None if cfg.data.packing == "none" else (cfg.data.batch_size, 16)
    shapes = batch_shapes(cfg.data.batch_size, 16, mode, packed, cfg.data.packing == "shared_prompt")
    return {k: np.zeros(shape, dtype) for k, (shape, dtype) in shapes.items()}


def abstract_batch(pairs: int, seq: int, mesh: jax.sharding.Mesh, mode: str,
                   packed: tuple[int, int] | None = None, shared: bool = False
                   ) -> dict[str, jax.ShapeDtypeStruct]:
    """`batch_shapes` as ShapeDtypeStructs split over the mesh's batch axes (what an
    ahead-of-time compile lowers the step with)."""
    shapes = batch_shapes(pairs, seq, mode, packed, shared)
    shardings = batch_shardings(mesh, shapes)
    return {k: jax.ShapeDtypeStruct(s, d, sharding=shardings[k]) for k, (s, d) in shapes.items()}


def abstract_train_state(arch: DecoderConfig, options: ModelOptions, optimizer: optax.GradientTransformation,
                         mesh: jax.sharding.Mesh, *, reference_mode: str, seed: int = 0,
                         init_scale: float = 0.02) -> tuple[StateDef, TrainState]:
    """`(StateDef, TrainState)` with a `jax.ShapeDtypeStruct` (shape, dtype, sharding) for
    every array, never allocated: a run's own `build_model` and `create_state` under
    `jax.eval_shape`, placed as a run on `mesh` places them (`place_abstract_state`).
    What `aot-check` and `benchmarks/memory_fit.py` compile."""
    made: dict[str, Any] = {}

    def init() -> TrainState:
        model = build_model(arch, options, mesh=mesh, seed=seed, init_scale=init_scale)
        made["sdef"], state = create_state(model, optimizer, lora=options.lora is not None,
                                           reference_mode=reference_mode, seed=seed)
        return state

    shapes = jax.eval_shape(init)
    return made["sdef"], place_abstract_state(shapes, optimizer, mesh)


def device_batch(batch: PreferenceBatch | PackedBatch, mesh: jax.sharding.Mesh,
                 ref_table: np.ndarray | None = None) -> dict[str, jax.Array]:
    """A `PreferenceBatch` or `PackedBatch` (this process's pairs) as the step's global
    arrays on `mesh`.

    `ref_table` `[rows, 2]` (model.reference=precomputed): the reference log-probs of
    every example, looked up by `example_index` (padding pairs get 0; they are masked).
    """
    from mmpo_jax.data.packing import PackedBatch  # as in `pack_spec`

    keys: tuple[str, ...] = BATCH_KEYS
    if isinstance(batch, PackedBatch):
        keys = PACKED_KEYS if batch.branches is None else SHARED_KEYS
    host = {k: np.asarray(getattr(batch, k)) for k in keys}
    if ref_table is not None:
        index = np.asarray(batch.example_index)
        host["ref_logps"] = np.where((index >= 0)[:, None], ref_table[np.maximum(index, 0)], 0.0).astype(np.float32)
    shardings = batch_shardings(mesh, host)
    return {k: jax.make_array_from_process_local_data(shardings[k], v) for k, v in host.items()}
