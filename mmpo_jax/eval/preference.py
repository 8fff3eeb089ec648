"""The preference metrics of a model on test pairs: the eval step's metrics (the loss's
own, rewards, accuracies, log-probs), averaged over the real pairs of every batch."""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import numpy as np

from mmpo_jax.train.setup import Trainer, device_batch

if TYPE_CHECKING:
    from mmpo_jax.data.pipeline import PreferenceData
    from mmpo_jax.train.state import TrainState


def evaluate(trainer: Trainer, state: TrainState, data: PreferenceData, ref_table: np.ndarray | None,
             max_batches: int = 0) -> dict[str, float]:
    """The eval step's metrics over the test data, averaged over real pairs (each
    batch's metrics weighted by its number of real pairs)."""
    from mmpo_jax.data.batches import eval_batches

    batches = eval_batches(data, trainer.cfg.data.batch_size, packing=trainer.packing)
    n = len(batches) if max_batches <= 0 else min(max_batches, len(batches))
    totals: dict[str, float] = {}
    weight = 0.0
    for b in range(n):
        host = batches[b]
        # every process's slice of the global batch: the real pairs of the whole batch
        rows = min((b + 1) * trainer.cfg.data.batch_size, len(data)) - b * trainer.cfg.data.batch_size
        metrics = jax.device_get(trainer.eval_step(state, device_batch(host, trainer.mesh, ref_table)))
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0.0) + float(v) * rows
        weight += rows
    return {k: v / weight for k, v in totals.items()}
