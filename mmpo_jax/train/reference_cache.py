"""`model.reference: precomputed`: the reference's log-probs of every example, computed
once and cached on disk.

Before training, one pass over a split runs the reference model (the initial policy,
or `model.reference_path`) on every row and keeps `[rows, 2]` float32 sequence
log-probs (chosen, rejected), in the data's row order. The table is stored as
`<train.output_dir>/reference_logps/<split>-<key>.npy`, where `key` hashes everything
the numbers depend on: the tokenized rows (ids after truncation), the model source
and architecture, the dtypes, how log-probs are reduced (`loss.average_logps`,
`loss.ld_alpha`) and the package version. A run
with the same key reuses the file (a resumed run never recomputes it); any change
of data, model or config gives a new key and a new pass.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mmpo_jax import loss_registry
from mmpo_jax.config_schema import RunConfig
from mmpo_jax import storage
from mmpo_jax.train.run_mirror import REFERENCE_DIR
from mmpo_jax.train.pair_logps import pair_logps

if TYPE_CHECKING:
    from mmpo_jax.models.llama import Llama
    from mmpo_jax.data.pipeline import PreferenceData


def data_fingerprint(data: PreferenceData) -> str:
    """A hash of the split's rows as the model sees them (ids and truncated lengths, in order)."""
    h = hashlib.sha256()
    h.update(json.dumps([data.max_length, data.max_prompt_length]).encode())
    for src in data.sources:
        for arr in (src.rows, src.lengths):
            h.update(np.ascontiguousarray(arr).tobytes())
        for col in sorted(src.values):
            h.update(col.encode())
            h.update(np.ascontiguousarray(src.values[col]).tobytes())
            h.update(np.ascontiguousarray(src.starts[col]).tobytes())
    return h.hexdigest()


def cache_key(cfg: RunConfig, data: PreferenceData) -> str:
    from mmpo_jax import __version__

    m = cfg.model
    source = m.reference_path or m.path
    described: dict[str, Any] = {"version": __version__, "source": source}
    if source:
        from mmpo_jax.paths import resolve

        if storage.is_url(source):  # in a bucket: each object's size and generation
            described["files"] = [[rel, st.size, st.version] for rel, st in storage.file_stats(source).items()]
        elif (path := Path(resolve(source)).expanduser()).exists():  # a local checkpoint: its files' sizes and times stand for its content
            files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
            described["files"] = [[str(f.relative_to(path) if path.is_dir() else f.name),
                                   f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    else:
        described["init"] = dataclasses.asdict(m.init)
        described["seed"] = cfg.train.seed
    described.update(
        param_dtype=m.param_dtype, compute_dtype=m.compute_dtype, attention=m.attention,
        average_logps=cfg.loss.average_logps, data=data_fingerprint(data),
        backend=jax.default_backend(),
    )
    ld_alpha = loss_registry.reduction(cfg.loss)["ld_alpha"]
    if ld_alpha is not None:  # (absent otherwise: the keys of runs from before it stay)
        described["ld_alpha"] = ld_alpha
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:20]


def reference_table(cfg: RunConfig, load_model: Callable[[], Llama], data: PreferenceData, split: str,
                    mesh: jax.sharding.Mesh, log: Callable[[str], None] = print) -> np.ndarray:
    """`[rows, 2]` float32 reference sequence log-probs of every row of `data`, from the
    cache when present, else computed (batches of `data.batch_size` pairs) by the model
    `load_model()` returns (called only then) and stored."""
    path = storage.join(cfg.train.output_dir, REFERENCE_DIR, f"{split}-{cache_key(cfg, data)}.npy")
    if storage.is_file(path):
        table = np.load(io.BytesIO(storage.read_bytes(path)))
        if table.shape == (len(data), 2):
            log(f"reference log-probs ({split}): reusing {path}")
            return table
    log(f"reference log-probs ({split}): one pass over {len(data)} rows")
    table = compute_table(cfg, load_model(), data, mesh)
    if jax.process_index() == 0:
        buffer = io.BytesIO()
        np.save(buffer, table)
        # a crash or a full disk never leaves a torn table under the real name, nor a temp file
        storage.write_bytes(path, buffer.getvalue())
    return table


def compute_table(cfg: RunConfig, model: Llama, data: PreferenceData, mesh: jax.sharding.Mesh) -> np.ndarray:
    from mmpo_jax.data.batches import eval_batches
    from mmpo_jax.train.setup import device_batch, pack_spec

    graphdef, state = nnx.split(model)
    replicated = NamedSharding(mesh, P())

    @jax.jit
    def logps(state, batch):
        out = pair_logps(nnx.merge(graphdef, state), batch, chunk=cfg.model.logprob_chunk,
                         **loss_registry.reduction(cfg.loss)).logps
        return jax.lax.with_sharding_constraint(out, replicated)

    bs = cfg.data.batch_size
    table = np.zeros((len(data), 2), np.float32)
    batches = eval_batches(data, bs, packing=pack_spec(cfg, mesh))
    for b in range(len(batches)):
        batch = device_batch(batches[b], mesh)
        # replicated: every process reads the whole batch's result from its own device
        out = np.asarray(logps(state, batch).addressable_data(0))
        # eval batches hold the rows in order, padding pairs (pair_mask 0) last
        rows = np.arange(b * bs, min((b + 1) * bs, len(data)))
        table[rows] = out[: len(rows)]
    return table
