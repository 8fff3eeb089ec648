"""A fixed example batch of sequence log-probs, for trying the losses without a model."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from mmpo_jax.config_schema import RunConfig
from mmpo_jax.losses.inputs import LossInputs
from mmpo_jax.losses.registry import bind_loss
from mmpo_jax.train.reference import reference_mode

EXAMPLE_PAIRS = 8
# The example's summed log-probs stand for completions of about this many tokens each.
EXAMPLE_TOKENS = 40.0
# ... after prompts of this many tokens, at this log-prob per token (ORPO's NLL covers them)
EXAMPLE_PROMPT_TOKENS = 20.0
EXAMPLE_PROMPT_LOGP = -1.5


def example_logps(seed: int, pairs: int = EXAMPLE_PAIRS) -> dict[str, np.ndarray]:
    """Plausible summed log-probs of ~40-token completions, `[pairs]` each.

    The policy starts near the reference and the chosen answers are a little
    more likely, as after supervised fine-tuning.
    """
    rng = np.random.default_rng(seed)
    ref_chosen = rng.uniform(-90.0, -30.0, pairs)
    ref_rejected = ref_chosen - rng.uniform(-5.0, 15.0, pairs)
    return {
        "policy_chosen_logps": ref_chosen + rng.normal(0.5, 1.0, pairs),
        "policy_rejected_logps": ref_rejected + rng.normal(-0.5, 1.0, pairs),
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }


def example_metrics(cfg: RunConfig, name: str) -> dict[str, float]:
    """Loss `name` on the example batch, as a run of `cfg` would compute it: the settings
    of `cfg.loss` for the configured loss, the loss's own defaults for another
    (`mmpo_jax.losses.binding.bind`); per-token means (every answer EXAMPLE_TOKENS tokens long)
    where it averages; a reference where the loss needs one, and for a loss that reads it
    only for its metrics (sft) when the run of `cfg` has one."""
    loss = bind_loss(cfg.loss, name=name)
    spec = loss.declaration
    scale = 1.0 / EXAMPLE_TOKENS if loss.averaged else 1.0
    batch = {k: jnp.asarray(v, jnp.float32) * scale for k, v in example_logps(cfg.train.seed).items()}
    with_reference = spec.reference_use == "required" or (
        spec.reference_use == "metrics_only" and name == cfg.loss.name
        and reference_mode(cfg.model.reference).exists)
    tokens = jnp.full((EXAMPLE_PAIRS,), EXAMPLE_TOKENS, jnp.float32)
    chosen_sums = batch["policy_chosen_logps"] / scale
    inputs = LossInputs(
        policy_chosen=batch["policy_chosen_logps"], policy_rejected=batch["policy_rejected_logps"],
        ref_chosen=batch["ref_chosen_logps"] if with_reference else None,
        ref_rejected=batch["ref_rejected_logps"] if with_reference else None,
        chosen_tokens=tokens, rejected_tokens=tokens,
        chosen_sequence_logps=chosen_sums + EXAMPLE_PROMPT_TOKENS * EXAMPLE_PROMPT_LOGP,
        chosen_sequence_tokens=tokens + EXAMPLE_PROMPT_TOKENS,
    )
    _, metrics = loss(inputs)
    return {k: float(v) for k, v in metrics.items()}
