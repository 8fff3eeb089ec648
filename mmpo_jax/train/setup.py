"""From a run config to what the step needs: mesh, policy, reference, optimizer, state.

`build_trainer(cfg, ...)` is the one place that turns `model.*`, `optim.*`,
`loss.*` and `mesh.*` into a `Trainer`; `mmpo-jax train`, `eval`, `compare --step`
and the benchmarks all go through it, so they run the same step, and `aot-check`
compiles the state of the same `build_model` + `create_state` under `jax.eval_shape`.
`build_policy` is its first part (the initial policy alone, for `generate`), and
`initial_reference` loads a run's starting reference again for the modes whose state
keeps none. A checkpoint read for inference (`run_restore.restore_inference`) restores
onto `abstract_run_state` (the same state, never allocated) and becomes an `Evaluator`
(`build_evaluator`: the eval step, no optimizer).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import jax
import optax

from mmpo_jax.config_schema import RunConfig
from mmpo_jax.data.layout import layout_of
from mmpo_jax.errors import UserError
from mmpo_jax.models.build import build_model
from mmpo_jax.models.decoder_config import DecoderConfig, model_config_from_init
from mmpo_jax.models.options import ModelOptions
from mmpo_jax.models.pretrained import load_checkpoint, open_checkpoint
from mmpo_jax.sharding import make_mesh
from mmpo_jax.train.optim import learning_rate_schedule, make_optimizer
from mmpo_jax.train.reference import ReferenceMode, held_model, reference_mode
from mmpo_jax.train.state import StateDef, TrainState, create_state, place_abstract_state, state_shardings
from mmpo_jax.train.step import (
    EvalStepFn,
    StepConfig,
    TrainStepFn,
    check_batch_divisible,
    make_eval_step,
    make_train_step,
)

if TYPE_CHECKING:
    from mmpo_jax.data.tokenizer_protocol import Tokenizer
    from mmpo_jax.models.decoder import Decoder
    from mmpo_jax.data.batches import PackSpec


def model_options(cfg: RunConfig, backend: str | None = None) -> ModelOptions:
    """The model options of `cfg` for `backend` (None: this process's JAX backend), for
    its batch layout (a packed `data.packing` hands the model segment ids); the attention
    kernel is chosen when the model is built, for its architecture."""
    return ModelOptions.from_config(cfg.model, backend, segments=layout_of(cfg.data.packing).segments)


def load_model(cfg: RunConfig, path: str, options: ModelOptions, mesh: jax.sharding.Mesh) -> tuple[Decoder, DecoderConfig]:
    """`(model, architecture)`: the checkpoint at `path`, or a random init when `path` is ""."""
    if path:
        model, arch, _ = load_checkpoint(path, options, mesh=mesh, with_tokenizer=False)
        return model, arch
    arch = model_config_from_init(cfg.model.init)
    model = build_model(arch, options, mesh=mesh, seed=cfg.train.seed, init_scale=cfg.model.init.init_scale)
    return model, arch


def policy_architecture(cfg: RunConfig) -> DecoderConfig:
    """The architecture `load_model` gives the run's policy, read without its weights:
    `model.path`'s config.json or GGUF metadata, or `model.init` when the path is ""."""
    if not cfg.model.path:
        return model_config_from_init(cfg.model.init)

    return DecoderConfig.from_hf_dict(open_checkpoint(cfg.model.path).hf_config)


def build_policy(cfg: RunConfig, mesh: jax.sharding.Mesh | None = None,
                 say: Callable[[str], None] | None = None) -> tuple[Decoder, DecoderConfig, ModelOptions]:
    """`(model, architecture, options)`: the run's initial policy alone, as `build_trainer`
    makes it (no optimizer or reference: what `generate` of a config needs). The options
    hold the attention kernel chosen for the architecture; `say` (a run's start lines)
    is told `auto`'s choice and its reason."""
    mesh = make_mesh(cfg.mesh) if mesh is None else mesh
    model, arch = load_model(cfg, cfg.model.path, model_options(cfg), mesh)
    options = model.options  # `kernel` chosen as the model was built
    line = options.model_choice(arch).start_line()
    if say is not None and line is not None:
        say(line)
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


def check_vocab(tokenizer: Tokenizer, arch: DecoderConfig, cfg: RunConfig) -> None:
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
class Evaluator:
    """A run's model state and its jitted eval step (`eval_step(state, batch)`), what eval,
    export, generate and the probes read: a `Trainer`, or a restored checkpoint's policy
    (`run_restore.restore_inference`), whose state may hold no optimizer state (`()`) and
    no reference (None).

    `eval_step` compiles once per batch shape (one per bucket length).
    """

    cfg: RunConfig
    mesh: jax.sharding.Mesh
    arch: DecoderConfig
    options: ModelOptions
    sdef: StateDef
    state: TrainState
    scfg: StepConfig
    eval_step: EvalStepFn
    packing: PackSpec | None = None  # `pack_spec(cfg, mesh)`: how the batches are packed


@dataclass(kw_only=True)
class Trainer(Evaluator):
    """An `Evaluator` that trains: its optimizer and jitted `train_step(state, batch)`
    (compiled once per batch shape, as `eval_step`)."""

    optimizer: optax.GradientTransformation
    train_step: TrainStepFn


def build_trainer(cfg: RunConfig, mesh: jax.sharding.Mesh | None = None,
                  devices: list | None = None, say: Callable[[str], None] | None = None) -> Trainer:
    """The initial state and jitted steps of `cfg` on `mesh` (default: from `mesh.*`);
    `say`: as `build_policy`'s."""
    mesh = make_mesh(cfg.mesh, devices=devices) if mesh is None else mesh
    check_batch_divisible(cfg.data.batch_size, cfg.optim.grad_accum, mesh)
    policy, arch, options = build_policy(cfg, mesh, say)
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
        policy, optimizer, lora=options.lora is not None, reference_mode=mode,
        reference_model=reference, seed=cfg.train.seed, mesh=mesh,
    )
    scfg = step_config(cfg, schedule, options)
    example = layout_of(cfg.data.packing).example(cfg.data.batch_size, mode)
    shardings = state_shardings(state)
    n = _num_params(state)
    return Trainer(
        cfg=cfg, mesh=mesh, arch=arch, options=options, sdef=sdef, state=state, optimizer=optimizer,
        scfg=scfg, train_step=make_train_step(sdef, scfg, optimizer, mesh, shardings, example, n),
        eval_step=make_eval_step(sdef, scfg, mesh, shardings, example, n), packing=_pack_spec(cfg, mesh),
    )


def _num_params(state: TrainState) -> int:
    """The policy's parameter count (the compiler options of the steps read it)."""
    return sum(x.size for x in jax.tree.leaves((state.trainable, state.frozen)))


def abstract_run_state(cfg: RunConfig, mesh: jax.sharding.Mesh
                       ) -> tuple[DecoderConfig, ModelOptions, StateDef, TrainState]:
    """`(architecture, options, StateDef, TrainState)` of `cfg`'s run on `mesh`, every
    array a placed `jax.ShapeDtypeStruct` (`abstract_train_state`): the shapes its
    checkpoints hold, without reading or allocating any weight. A restore target."""
    arch, options = policy_architecture(cfg), model_options(cfg)
    # the optimizer only shapes the (abstract) moments: its schedule's length changes none
    optimizer = make_optimizer(cfg.optim, cfg.train.max_steps or 1)
    mode = reference_mode(cfg.model.reference)
    sdef, state = abstract_train_state(arch, options, optimizer, mesh, reference_mode=mode, seed=cfg.train.seed,
                                       init_scale=cfg.model.init.init_scale)
    return arch, options, sdef, state


def build_evaluator(cfg: RunConfig, mesh: jax.sharding.Mesh, arch: DecoderConfig, options: ModelOptions,
                    sdef: StateDef, state: TrainState) -> Evaluator:
    """The `Evaluator` of `state` (arrays on `mesh`, e.g. a restored checkpoint's): its eval
    step, compiled for the state as it is (no optimizer state, or no reference, when the
    state holds none)."""
    scfg = step_config(cfg, learning_rate_schedule(cfg.optim, cfg.train.max_steps or 1), options)
    example = layout_of(cfg.data.packing).example(cfg.data.batch_size, sdef.reference_mode)
    eval_step = make_eval_step(sdef, scfg, mesh, state_shardings(state), example, _num_params(state))
    return Evaluator(cfg=cfg, mesh=mesh, arch=arch, options=options, sdef=sdef, state=state, scfg=scfg,
                     eval_step=eval_step, packing=_pack_spec(cfg, mesh))


def initial_reference(run: Evaluator) -> Decoder:
    """The run's reference as it was before training, loaded anew from the config:
    `model.reference_path` where the mode reads one (separate, precomputed), else the
    policy's starting point (`model.path`, or the seeded random init, which loads to the
    same weights every time). Loaded with the run's options, so LoRA adapters exist with
    B = 0 and add nothing. For the modes that keep no reference model: the precomputed
    reference pass, and the win rate's comparison model."""
    cfg = run.cfg
    mode = run.sdef.reference_mode
    if cfg.model.reference_path and (mode.stores_weights or mode.precomputed):
        reference = load_reference(cfg, run.options, run.mesh, run.arch)
        assert reference is not None  # a reference_path always loads one
        return reference
    model, _ = load_model(cfg, cfg.model.path, run.options, run.mesh)
    return model


def _pack_spec(cfg: RunConfig, mesh: jax.sharding.Mesh) -> PackSpec | None:
    """`batches.pack_spec`, None for a layout without packed rows before any data code
    loads: a step built on arrays of its own (benchmarks/, the GPU image, which has no
    `datasets`) imports none."""
    if not layout_of(cfg.data.packing).segments:
        return None
    from mmpo_jax.data.batches import pack_spec  # lazy: see above

    return pack_spec(cfg, mesh)


def run_reference(run: Evaluator) -> Decoder | None:
    """The run's reference model: the one its state holds (separate, lora_base), the
    initial one loaded again for `precomputed` (its state keeps only log-probs), None
    for `none`."""
    held = held_model(run)
    if held is None and run.sdef.reference_mode.precomputed:
        return initial_reference(run)
    return held


def abstract_train_state(arch: DecoderConfig, options: ModelOptions, optimizer: optax.GradientTransformation,
                         mesh: jax.sharding.Mesh, *, reference_mode: ReferenceMode, seed: int = 0,
                         init_scale: float = 0.02) -> tuple[StateDef, TrainState]:
    """`(StateDef, TrainState)` with a `jax.ShapeDtypeStruct` (shape, dtype, sharding) for
    every array, never allocated: a run's own `build_model` and `create_state` under
    `jax.eval_shape`, placed as a run on `mesh` places them (`place_abstract_state`).
    What `aot-check` and `benchmarks/memory_fit.py` compile."""
    made: dict[str, StateDef] = {}

    def init() -> TrainState:
        model = build_model(arch, options, mesh=mesh, seed=seed, init_scale=init_scale)
        made["sdef"], state = create_state(model, optimizer, lora=options.lora is not None,
                                           reference_mode=reference_mode, seed=seed)
        return state

    shapes = jax.eval_shape(init)
    return made["sdef"], place_abstract_state(shapes, optimizer, mesh)
