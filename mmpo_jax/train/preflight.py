"""The checks a run can make in a moment, before it spends time loading anything.

A wrong path or an impossible batch should stop a run at once, not after the model
has been read and the step-0 eval has run: `check_paths` looks at every path the
config names (data files, model and reference checkpoints, the output directory)
without reading them, and `check_batch_fits` runs as soon as the data is tokenized,
before the model is built.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from mmpo_jax.errors import UserError

if TYPE_CHECKING:
    from mmpo_jax.data.pipeline import PreferenceData
    from mmpo_jax.config_schema import RunConfig

def check_paths(cfg: RunConfig) -> None:
    """Every path of `cfg` exists where it must; a UserError naming the key otherwise.

    A hub id is resolved here too (downloaded, or found in the HF cache), so an unknown
    id or an unreachable hub is reported before the data is tokenized.
    """
    out = cfg.train.output_dir
    if not out.strip():
        raise UserError("train.output_dir is empty: name the run's directory, e.g. train.output_dir=runs/my-run")
    from mmpo_jax import storage

    if storage.is_url(out):
        storage.check_bucket(out, "train.output_dir")
    elif Path(out).expanduser().is_file():
        raise UserError(f"train.output_dir={out!r} is a file, not a directory: choose another train.output_dir")
    from mmpo_jax.data.sources import local_data_file, source_specs

    for which in ("train", "test"):
        for src in source_specs(cfg.data, which):
            local_data_file(src)
    from mmpo_jax.models.checkpoints import resolve_checkpoint_path

    for key, spec in (("model.path", cfg.model.path), ("model.reference_path", cfg.model.reference_path)):
        if spec:
            try:
                resolve_checkpoint_path(spec)
            except UserError as err:
                raise UserError(f"{key}={spec!r}: {err}") from None


def check_batch_fits(train: PreferenceData, batch_size: int) -> None:
    """At least one global batch of `data.batch_size` pairs among the kept training rows."""
    if len(train) < batch_size:
        raise UserError(
            f"data.batch_size={batch_size} is larger than the {len(train)} training rows kept: "
            f"lower data.batch_size to at most {len(train)}, or add training data"
        )
