"""Names the config accepts whose meaning lives above it: the model families
(`mmpo_jax.models.families` has a row for each) and the metric trackers
(`mmpo_jax.train.trackers`). A leaf, so the config checks a name without importing the
model or the trainer.
"""

from __future__ import annotations

# `model.init.model_type` (and what a checkpoint's config.json is read as)
MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3")
# `train.report_to`, besides `none`
TRACKERS = ("tensorboard", "mlflow", "wandb")
