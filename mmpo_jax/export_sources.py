"""Where an export of a run may not go, and the base model a LoRA adapter export names.

`mmpo-jax export RUN_DIR OUT_DIR` (`mmpo_jax.commands.export`) checks OUT_DIR here before
the (slow) restore: never the run directory or what the run manages inside it, never a
checkpoint the run reads (`model.path`, `model.reference_path`), nor a directory holding
one. `mmpo_jax.models.export_dir` then guards the files inside OUT_DIR itself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mmpo_jax import storage
from mmpo_jax.errors import UserError
from mmpo_jax.models.lora_export import BASE_DIR, peft_base_name
from mmpo_jax.paths import resolve
from mmpo_jax.train.checkpoint import CHECKPOINTS_DIR, INCOMPLETE_DIR
from mmpo_jax.train.run_files import TENSORBOARD_DIR
from mmpo_jax.train.run_mirror import REFERENCE_DIR

if TYPE_CHECKING:
    from mmpo_jax.config_schema import RunConfig

# What the run itself manages inside its directory: its next start moves or prunes what it
# finds there (RUN/checkpoints/99 was taken for a checkpoint and moved aside); RUN/export
# and the like are the user's.
RUN_MANAGED_DIRS = (CHECKPOINTS_DIR, INCOMPLETE_DIR, REFERENCE_DIR, TENSORBOARD_DIR, "wandb")


def real_path(path: str | os.PathLike) -> Path:
    """A local path, `~` expanded and symlinks resolved."""
    return Path(os.path.realpath(Path(path).expanduser()))


def _where(location: str | os.PathLike) -> str:
    """A location in one spelling: a URL without its trailing '/', a local path resolved."""
    return str(location).rstrip("/") if storage.is_url(location) else str(real_path(location))


def check_not_a_source(out_dir: str | os.PathLike, run_dir: str | os.PathLike, cfg: RunConfig) -> None:
    """A UserError when OUT_DIR is, or holds, the run directory or a checkpoint the run reads
    (`model.path`, `model.reference_path`; a file such as a .gguf is held by its directory),
    or lies inside a directory the run manages (`RUN_MANAGED_DIRS`).

    An earlier export can be such a checkpoint (a LoRA run's base model), and `--overwrite`
    would then replace the weights the run and its adapter need. Paths are compared after
    resolving symlinks and `pkg:` specs; a hub id has no local path to protect.
    """
    out = _where(out_dir)
    protected: list[tuple[str, str, str | None]] = [
        ("the run directory", _where(run_dir), str(storage.join(run_dir, "export")))]
    for key in ("path", "reference_path"):
        spec = getattr(cfg.model, key, "") or ""
        if not spec:
            continue
        if storage.is_url(spec):
            protected.append((f"the run's model.{key} ('{spec}')", _where(spec), None))
            continue
        try:
            local = Path(resolve(spec)).expanduser()
        except UserError:  # an uninstalled pkg: spec, so nothing local to protect
            continue
        if local.exists():
            protected.append((f"the run's model.{key} ('{spec}')", _where(local), None))
    for what, path, instead in protected:
        if out == path or path.startswith(out.rstrip("/") + "/"):
            relation = "is" if out == path else "holds"
            hint = f", e.g. '{instead}'" if instead else ""
            raise UserError(f"'{out_dir}' {relation} {what}, which the export must not write into; "
                            f"export to another directory{hint}")
    for managed in RUN_MANAGED_DIRS:
        inside = _where(storage.join(run_dir, managed))
        if out == inside or out.startswith(inside.rstrip("/") + "/"):
            raise UserError(f"'{out_dir}' is inside the run's {managed}/ directory, which the run manages (a later "
                            f"start moves or prunes what it finds there); export to another directory, e.g. "
                            f"'{storage.join(run_dir, 'export')}'")


@dataclass(frozen=True)
class AdapterBase:
    """The base `adapter_config.json` names (`name`), and whether the export writes it
    into OUT_DIR/base (`written`) because PEFT could not open `model.path`."""

    name: str
    written: bool


def adapter_base(out_dir: str | os.PathLike, model_path: str) -> AdapterBase:
    """The base of an `--adapter` export to `out_dir` of a run on `model_path`."""
    if not model_path:
        raise UserError("--adapter needs a base model others can load (model.path); this run starts "
                        "from a random init: export the full model instead")
    name = peft_base_name(model_path)
    if name is not None:
        return AdapterBase(name, written=False)
    # named where it will be once in place: the export is written elsewhere, then moved or copied there
    where = storage.join(out_dir, BASE_DIR) if storage.is_url(out_dir) else real_path(out_dir) / BASE_DIR
    return AdapterBase(str(where), written=True)
