"""`model.reference: precomputed`: the reference's log-probs of every example, computed
once and cached on disk.

Before training, one pass over a split runs the reference model (the initial policy,
or `model.reference_path`) on every row and keeps `[rows, 2]` float32 sequence
log-probs (chosen, rejected), in the data's row order. The table is stored as
`<train.output_dir>/reference_logps/<split>-<key>.npy`, where `key` hashes everything
the numbers depend on: the tokenized rows (ids after truncation), the model source
and architecture, the dtypes, how log-probs are reduced (`loss.average_logps`,
`loss.ld_alpha`) and the package version. A run with the same key reuses the file (a
resumed run never recomputes it) once its bytes match the SHA-256 stored beside it
(`<name>.sha256.json`, written after the table) and it reads as finite float32 of the
right shape; any other file is said, moved aside and recomputed. Any change of data,
model or config gives a new key and a new pass.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mmpo_jax import __version__
from mmpo_jax.data.batches import eval_batches, pack_spec
from mmpo_jax.data.layout import DeviceBatch, device_batch
from mmpo_jax.losses import declarations as loss_declarations
from mmpo_jax.paths import resolve
from mmpo_jax.config_schema import RunConfig
from mmpo_jax import storage
from mmpo_jax.errors import UserError, first_line
from mmpo_jax.train.run_mirror import REFERENCE_DIR
from mmpo_jax.train.pair_logps import pair_logps

if TYPE_CHECKING:
    from mmpo_jax.models.decoder import Decoder
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
    m = cfg.model
    source = m.reference_path or m.path
    described: dict[str, Any] = {"version": __version__, "source": source}
    if source:
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
    ld_alpha = loss_declarations.reduction(cfg.loss)["ld_alpha"]
    if ld_alpha is not None:  # (absent otherwise: the keys of runs from before it stay)
        described["ld_alpha"] = ld_alpha
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:20]


def reference_table(cfg: RunConfig, load_model: Callable[[], Decoder], data: PreferenceData, split: str,
                    mesh: jax.sharding.Mesh, log: Callable[[str], None] = print) -> np.ndarray:
    """`[rows, 2]` float32 reference sequence log-probs of every row of `data`, from the
    cache when it verifies (`cached_table`), else computed (batches of `data.batch_size`
    pairs) by the model `load_model()` returns (called only then) and stored with its
    checksum."""
    path = storage.join(cfg.train.output_dir, REFERENCE_DIR, f"{split}-{cache_key(cfg, data)}.npy")
    table = cached_table(path, len(data), split, log)
    if table is not None:
        return table
    log(f"reference log-probs ({split}): one pass over {len(data)} rows")
    table = compute_table(cfg, load_model(), data, mesh)
    bad = ~np.isfinite(table).all(axis=1)
    if bad.any():
        # the reference model itself gives these pairs no finite log-prob: no learning rate fixes that
        raise UserError(
            f"the reference model ({cfg.model.reference_path or cfg.model.path or 'the random init'}) gives "
            f"{int(bad.sum())} of {len(data)} {split} pairs a non-finite log-prob (first: pair "
            f"{int(np.flatnonzero(bad)[0])}); check that model's weights (model.reference_path / model.path)")
    if jax.process_index() == 0:
        buffer = io.BytesIO()
        np.save(buffer, table)
        body = buffer.getvalue()
        # a crash or a full disk never leaves a torn table under the real name, nor a temp file;
        # the checksum goes last, so a table without one is never taken as verified
        storage.write_bytes(path, body)
        storage.write_text(_checksum_path(path), json.dumps(
            {"sha256": hashlib.sha256(body).hexdigest(), "rows": len(data)}) + "\n")
    return table


def _checksum_path(path: storage.Location) -> str:
    return f"{path}.sha256.json"


def cached_table(path: storage.Location, rows: int, split: str, log: Callable[[str], None]) -> np.ndarray | None:
    """The table stored at `path`, when its bytes match the checksum stored beside it and it
    reads as `[rows, 2]` finite float32; None when there is none. A table that fails any of
    that (bit rot, an edited or truncated file, one from before checksums) is said, moved to
    `<name>.bad-<time>` and recomputed by the caller: reusing it would change training."""
    if not storage.is_file(path):
        return None
    problem = _table_problem(path, rows)
    if isinstance(problem, np.ndarray):
        log(f"reference log-probs ({split}): reusing {path} (checksum verified)")
        return problem
    if jax.process_index() == 0:
        aside = f"{path}.bad-{time.strftime('%Y%m%d-%H%M%S')}"
        storage.move(path, aside)
        if storage.is_file(_checksum_path(path)):
            storage.move(_checksum_path(path), f"{aside}.sha256.json")
        log(f"warning: reference log-probs ({split}): {path} {problem}; moved to {aside}, recomputing it")
    return None


def _table_problem(path: storage.Location, rows: int) -> str | np.ndarray:
    """The verified table, or what is wrong with the file (every process reads the same bytes)."""
    body = storage.read_bytes(path)
    try:
        recorded = json.loads(storage.read_text(_checksum_path(path)))
        want = str(recorded["sha256"])
    except FileNotFoundError:
        return "has no checksum beside it (written before tables were checksummed, or cut off)"
    except (OSError, ValueError, KeyError, TypeError):
        return "has an unreadable checksum file"
    if hashlib.sha256(body).hexdigest() != want:
        return "does not match its checksum (changed on disk)"
    try:
        table = np.load(io.BytesIO(body), allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        return f"cannot be read as a .npy array ({first_line(err)})"
    if table.dtype != np.float32 or table.shape != (rows, 2) or not np.isfinite(table).all():
        return f"holds {table.dtype} {list(table.shape)}, not finite float32 [{rows}, 2]"
    return table


def compute_table(cfg: RunConfig, model: Decoder, data: PreferenceData, mesh: jax.sharding.Mesh) -> np.ndarray:
    graphdef, state = nnx.split(model)
    replicated = NamedSharding(mesh, P())

    @jax.jit
    def logps(state: nnx.State, batch: DeviceBatch) -> jax.Array:
        out = pair_logps(nnx.merge(graphdef, state), batch, chunk=cfg.model.logprob_chunk,
                         **loss_declarations.reduction(cfg.loss)).logps
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
