"""The optimizer: AdamW with warmup then cosine / linear / constant, global-norm clipping.

Schedules follow transformers' `get_*_schedule_with_warmup` (what TRL runs):
optimizer step k (counting from 0) uses `lr(k)`, so with warmup the first
update has learning rate 0, as in a TRL run of the same config.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mmpo_jax.config_schema import OptimConfig

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def learning_rate_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """`step -> learning rate` for `total_steps` optimizer steps."""
    peak = cfg.learning_rate
    warmup = min(cfg.warmup_steps, total_steps)
    decay_steps = max(total_steps - warmup, 1)

    def schedule(step: jax.Array | int) -> jax.Array:
        step = jnp.asarray(step, jnp.float32)
        warm = step / max(warmup, 1)
        progress = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
        if cfg.schedule == "cosine":
            after = 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        elif cfg.schedule == "linear":
            after = 1.0 - progress
        else:
            after = jnp.ones_like(progress)
        return peak * jnp.where(step < warmup, warm, after)

    return schedule


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """Global-norm clipping (skipped when `max_grad_norm <= 0`), then AdamW."""
    adamw = optax.adamw(
        learning_rate=learning_rate_schedule(cfg, total_steps),
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        mu_dtype=_DTYPES[cfg.mu_dtype],
    )
    if cfg.max_grad_norm > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), adamw)
    return adamw
