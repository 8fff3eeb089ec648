"""Our model -> an HF directory (`config.json`, safetensors, tokenizer) that transformers
and vLLM load; tensors stream to disk one at a time.

    export_hf(model, cfg, tokenizer, "runs/x/export")
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Iterable

import ml_dtypes
import numpy as np

from mmpo_jax.errors import UserError
from mmpo_jax.models.hf_weights import iter_hf_weights
from mmpo_jax.models.pretrained import (
    CONFIG_FILE,
    DEFAULT_MAX_SHARD_BYTES,
    SAFETENSORS_FILE,
    SAFETENSORS_INDEX,
)
from mmpo_jax.models.export_dir import export_directory

if TYPE_CHECKING:
    from mmpo_jax.data.tokenizer_protocol import Tokenizer
    from mmpo_jax.models.decoder import Decoder
    from mmpo_jax.models.decoder_config import DecoderConfig

_NP_TO_ST = {
    np.dtype(np.float32): "F32",
    np.dtype(np.float16): "F16",
    np.dtype(np.float64): "F64",
}


def _st_code(dtype: np.dtype) -> str:
    if dtype in _NP_TO_ST:
        return _NP_TO_ST[dtype]

    if dtype == np.dtype(ml_dtypes.bfloat16):
        return "BF16"
    raise UserError(f"cannot write dtype {dtype} to safetensors")


class _ShardWriter:
    """Streams tensors into safetensors shards: each tensor's bytes go to a spill
    file as they come; a full shard gets its header written and the bytes copied
    behind it. Never more than one tensor in memory."""

    def __init__(self, out_dir: Path, max_shard_bytes: int):
        self.out_dir = out_dir
        self.max_shard_bytes = max_shard_bytes
        self.shards: list[tuple[Path, list[str]]] = []  # temp file, tensor names
        self._entries: dict[str, Any] = {}
        self._spill: BinaryIO | None = None
        self._spill_path: Path | None = None
        self._offset = 0
        self.total_bytes = 0

    def add(self, name: str, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array)
        nbytes = array.nbytes
        if self._spill is not None and self._offset > 0 and self._offset + nbytes > self.max_shard_bytes:
            self._finish_shard()
        if self._spill is None:
            self._spill_path = self.out_dir / f".export-shard-{len(self.shards):05d}.tmp"
            self._spill = open(self._spill_path, "wb")
            self._entries = {}
            self._offset = 0
        self._spill.write(array.tobytes(order="C"))
        self._entries[name] = {
            "dtype": _st_code(array.dtype),
            "shape": list(array.shape),
            "data_offsets": [self._offset, self._offset + nbytes],
        }
        self._offset += nbytes
        self.total_bytes += nbytes

    def _finish_shard(self) -> None:
        assert self._spill is not None and self._spill_path is not None
        self._spill.close()
        header = {"__metadata__": {"format": "pt"}, **self._entries}
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        final = self._spill_path.with_suffix(".st")
        with open(final, "wb") as out, open(self._spill_path, "rb") as data:
            out.write(struct.pack("<Q", len(raw)))
            out.write(raw)
            shutil.copyfileobj(data, out, length=64 * 1024 * 1024)
        self._spill_path.unlink()
        self.shards.append((final, list(self._entries)))
        self._spill = None

    def close(self) -> dict[str, str]:
        """Names the shards; returns the weight map (tensor -> file name)."""
        if self._spill is not None:
            self._finish_shard()
        n = len(self.shards)
        weight_map: dict[str, str] = {}
        for i, (tmp, names) in enumerate(self.shards):
            fname = SAFETENSORS_FILE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            tmp.replace(self.out_dir / fname)
            weight_map.update({name: fname for name in names})
        return weight_map


def export_hf(
    model: Decoder,
    cfg: DecoderConfig,
    tokenizer: Tokenizer | None,
    out_dir: str | os.PathLike,
    *,
    dtype: str = "float32",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    weights: Iterable[tuple[str, np.ndarray]] | None = None,
    overwrite: bool = False,
    about: dict[str, Any] | None = None,
) -> Path:
    """Writes an HF directory transformers (and vLLM) load: `config.json`, safetensors, tokenizer.

    Tensors stream from `iter_hf_weights(model)` (or `weights`) one at a time into
    `model.safetensors`, or into `model-0000i-of-0000n.safetensors` shards of at
    most `max_shard_bytes` with a `model.safetensors.index.json`. `dtype` is
    `float32` or `bfloat16`. The tokenizer (if any) is saved with its chat template.

    `out_dir` must be new, empty, or (with `overwrite`) an earlier export and nothing
    else (`check_export_target`); the export is written beside it and renamed into place
    (`export_directory`, which adds `mmpo_export.json`, with `about` in it), so a failure
    leaves `out_dir` as it was.
    """
    _np_dtype(dtype)  # an unknown dtype is refused before anything is created
    with export_directory(out_dir, kind="hf", overwrite=overwrite, about={"dtype": dtype, **(about or {})}) as out:
        write_hf_files(out, cfg, tokenizer, weights if weights is not None else iter_hf_weights(model),
                       dtype=dtype, max_shard_bytes=max_shard_bytes)
    return Path(out_dir)


def write_hf_files(
    out: Path,
    cfg: DecoderConfig,
    tokenizer: Tokenizer | None,
    weights: Iterable[tuple[str, np.ndarray]],
    *,
    dtype: str = "float32",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> None:
    """The files of an HF directory (see `export_hf`) written into `out`, created if absent.

    No export record and no rename into place: this is for a directory inside an export
    that `export_directory` already guards, such as the base model beside a LoRA adapter.
    """
    np_dtype = _np_dtype(dtype)
    out.mkdir(parents=True, exist_ok=True)
    writer = _ShardWriter(out, max_shard_bytes)
    try:
        for name, array in weights:
            writer.add(name, np.asarray(array).astype(np_dtype, copy=False))
        weight_map = writer.close()
    finally:
        for tmp in out.glob(".export-shard-*"):
            tmp.unlink()
    if len(set(weight_map.values())) > 1:
        index = {"metadata": {"total_size": writer.total_bytes}, "weight_map": weight_map}
        (out / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")

    hf = cfg.to_hf_dict()
    hf["torch_dtype"] = dtype
    hf["dtype"] = dtype
    (out / CONFIG_FILE).write_text(json.dumps(hf, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))


def _np_dtype(dtype: str) -> np.dtype:
    if dtype not in ("float32", "bfloat16", "float16"):
        raise UserError(f"export dtype '{dtype}' is not supported; choose float32, bfloat16 or float16")
    if dtype == "bfloat16":
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(dtype)
