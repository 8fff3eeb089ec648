"""From a run config to what the step needs: mesh, policy, reference, optimizer, state.

`build_trainer(cfg, ...)` is the one place that turns `model.*`, `optim.*`,
`loss.*` and `mesh.*` into a `Trainer`; `mmpo-jax train`, `eval`, `compare --step`
and the benchmarks all go through it, so they run the same step.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import jax
import numpy as np
import optax

from mmpo_jax.config import RunConfig
from mmpo_jax.errors import UserError
from mmpo_jax.models.llama import LlamaConfig, ModelOptions, build_model, model_config_from_init
from mmpo_jax.sharding import make_mesh
from mmpo_jax.train.optim import learning_rate_schedule, make_optimizer
from mmpo_jax.train.reference import reference_mode
from mmpo_jax.train.state import StateDef, TrainState, create_state, state_shardings
from mmpo_jax.train.step import StepConfig, check_batch_divisible, make_eval_step, make_train_step


def model_options(cfg: RunConfig, backend: str | None = None) -> ModelOptions:
    """The model options of `cfg` for `backend` (None: this process's JAX backend)."""
    return ModelOptions.from_config(cfg.model, backend)


def load_model(cfg: RunConfig, path: str, options: ModelOptions, mesh: jax.sharding.Mesh) -> tuple[Any, LlamaConfig]:
    """`(model, architecture)`: the checkpoint at `path`, or a random init when `path` is ""."""
    if path:
        from mmpo_jax.models.checkpoints import load_checkpoint

        model, arch, _ = load_checkpoint(path, options, mesh=mesh, with_tokenizer=False)
        return model, arch
    arch = model_config_from_init(cfg.model.init)
    model = build_model(arch, options, mesh=mesh, seed=cfg.train.seed, init_scale=cfg.model.init.init_scale)
    return model, arch


def load_reference(cfg: RunConfig, options: ModelOptions, mesh: jax.sharding.Mesh,
                   policy_arch: LlamaConfig) -> Any | None:
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


def check_vocab(tokenizer: Any, arch: LlamaConfig, cfg: RunConfig) -> None:
    """Every token id of `data.tokenizer` must index the model's embedding."""
    n = len(tokenizer)
    if n > arch.vocab_size:
        where = f"model.path={cfg.model.path!r}" if cfg.model.path else f"model.init.vocab_size={arch.vocab_size}"
        raise UserError(
            f"data.tokenizer={cfg.data.tokenizer!r} has {n} tokens but the model's vocabulary has "
            f"{arch.vocab_size} ({where}); use the model's own tokenizer or a larger vocabulary"
        )


def step_config(cfg: RunConfig, schedule: Callable[[jax.Array], jax.Array], options: ModelOptions) -> StepConfig:
    return StepConfig(
        loss=cfg.loss,
        grad_accum=cfg.optim.grad_accum,
        logprob_chunk=cfg.model.logprob_chunk,
        schedule=schedule,
        dropout=options.uses_dropout,
    )


@dataclass
class Trainer:
    """A run's model state and its jitted steps (`train_step(state, batch)`, `eval_step`).

    `train_step` / `eval_step` compile once per batch shape (one per bucket length).
    """

    cfg: RunConfig
    mesh: jax.sharding.Mesh
    arch: LlamaConfig
    options: ModelOptions
    sdef: StateDef
    state: TrainState
    optimizer: optax.GradientTransformation
    scfg: StepConfig
    train_step: Callable
    eval_step: Callable
    # the initial reference model for model.reference=precomputed (None otherwise);
    # `mmpo_jax.train.reference_cache` reads it before the first step, then drops it
    precompute_model: Any = None


def build_trainer(cfg: RunConfig, mesh: jax.sharding.Mesh | None = None,
                  devices: list | None = None) -> Trainer:
    """The initial state and jitted steps of `cfg` on `mesh` (default: from `mesh.*`)."""
    mesh = make_mesh(cfg.mesh, devices=devices) if mesh is None else mesh
    check_batch_divisible(cfg.data.batch_size, cfg.optim.grad_accum, mesh)
    options = model_options(cfg)
    policy, arch = load_model(cfg, cfg.model.path, options, mesh)
    reference = load_reference(cfg, options, mesh, arch)
    mode = reference_mode(cfg.model.reference)
    total = cfg.train.max_steps
    optimizer = make_optimizer(cfg.optim, total)
    schedule = learning_rate_schedule(cfg.optim, total)
    precompute_model = None
    if mode.precomputed:
        # the initial weights, copied: the policy's own buffers are donated by the step
        precompute_model = reference if reference is not None else _copy_model(policy)
    sdef, state = create_state(
        policy, optimizer, lora=options.lora is not None, reference_mode=mode.name,
        reference_model=reference if mode.stores_weights else None, seed=cfg.train.seed, mesh=mesh,
    )
    scfg = step_config(cfg, schedule, options)
    example = example_batch(cfg, mode.name)
    shardings = state_shardings(state)
    n = sum(x.size for x in jax.tree.leaves((state.trainable, state.frozen)))
    return Trainer(
        cfg=cfg, mesh=mesh, arch=arch, options=options, sdef=sdef, state=state, optimizer=optimizer,
        scfg=scfg, train_step=make_train_step(sdef, scfg, optimizer, mesh, shardings, example, n),
        eval_step=make_eval_step(sdef, scfg, mesh, shardings, example, n), precompute_model=precompute_model,
    )


def _copy_model(model: Any) -> Any:
    from flax import nnx

    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(lambda x: x.copy(), state))


BATCH_KEYS = ("input_ids", "loss_mask", "pair_mask")


def example_batch(cfg: RunConfig, mode: str) -> dict[str, np.ndarray]:
    """The keys and dtypes of the step's batch (shapes do not matter: only the shardings are read)."""
    pairs, seq = cfg.data.batch_size, 16
    batch = {
        "input_ids": np.zeros((pairs, 2, seq), np.int32),
        "loss_mask": np.zeros((pairs, 2, seq), np.int32),
        "pair_mask": np.ones((pairs,), np.int32),
    }
    for key in reference_mode(mode).batch_keys:  # ref_logps of `precomputed`
        batch[key] = np.zeros((pairs, 2), np.float32)
    return batch


def device_batch(batch: Any, mesh: jax.sharding.Mesh, ref_table: np.ndarray | None = None) -> dict[str, jax.Array]:
    """A `PreferenceBatch` (this process's pairs) as the step's global arrays on `mesh`.

    `ref_table` `[rows, 2]` (model.reference=precomputed): the reference log-probs of
    every example, looked up by `example_index` (padding pairs get 0; they are masked).
    """
    from mmpo_jax.train.step import batch_shardings

    host = {k: np.asarray(getattr(batch, k)) for k in BATCH_KEYS}
    if ref_table is not None:
        index = np.asarray(batch.example_index)
        host["ref_logps"] = np.where((index >= 0)[:, None], ref_table[np.maximum(index, 0)], 0.0).astype(np.float32)
    shardings = batch_shardings(mesh, host)
    return {k: jax.make_array_from_process_local_data(shardings[k], v) for k, v in host.items()}
