"""The header of a safetensors file, read and checked before any tensor is.

A safetensors file is an 8-byte little-endian header length, that many bytes of JSON
(`{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}`), then
the data, the offsets counted from its start. The `safetensors` package refuses a
file that lies about any of it with a bare "invalid offset for tensor" or
"incomplete metadata" (and BF16 tensors, which we memory-map ourselves, are not
checked by it at all), so the rules it applies are checked here first, and a broken
file is one line naming it, the tensor and what is wrong.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from mmpo_jax.errors import UserError

# safetensors' own MAX_HEADER_SIZE: no real header comes near it, and reading a lying
# length (2**63) would try to allocate it.
HEADER_LIMIT = 100_000_000

# Every dtype safetensors 0.8 knows, with its size in bits (F4 and F6 pack below a byte).
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "I16": 16, "U16": 16, "F16": 16,
    "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}


@dataclass(frozen=True)
class TensorEntry:
    dtype: str
    shape: tuple[int, ...]
    begin: int  # byte offsets into the data section
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    data_start: int  # where the data section begins in the file: 8 + the header's length
    tensors: dict[str, TensorEntry]


def read_header(path: Path) -> SafetensorsHeader:
    """The checked header of the safetensors file `path`; a UserError naming the file (and
    the tensor) when the file is not one, is cut short, or its header lies about it."""
    try:
        return _read(path)
    except _Bad as problem:
        raise UserError(f"'{path}' is not a valid safetensors file: {problem}; "
                        "download or export it again") from None
    except OSError as err:
        raise UserError(f"cannot read '{path}': {err.strerror or err}") from None


class _Bad(Exception):
    """What is wrong with the file (`read_header` adds which file)."""


def _read(path: Path) -> SafetensorsHeader:
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        f.seek(0)
        if size < 8:
            raise _Bad(f"it has {size} bytes, fewer than the 8 of its header length")
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8:
            raise _Bad(f"its header length {n} is past the end of the file ({size} bytes): is it cut short?")
        if n > HEADER_LIMIT:
            raise _Bad(f"its header length {n} is over safetensors' limit of {HEADER_LIMIT}")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise _Bad(f"its {n}-byte header is not JSON ({err})") from None
    if not isinstance(header, dict):
        raise _Bad(f"its header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _Bad("its __metadata__ is not a mapping of strings")
    tensors = {name: _entry(name, info) for name, info in header.items()}
    _check_layout(tensors, size - 8 - n)
    return SafetensorsHeader(8 + n, tensors)


def _entry(name: str, info: object) -> TensorEntry:
    if not isinstance(info, dict):
        raise _Bad(f"tensor '{name}' has no dtype/shape/data_offsets entry")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in DTYPE_BITS:
        raise _Bad(f"tensor '{name}' has dtype {dtype!r}, which safetensors does not know")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise _Bad(f"tensor '{name}' has shape {shape!r}, not a list of sizes >= 0")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets) \
            or offsets[0] > offsets[1]:
        raise _Bad(f"tensor '{name}' has data_offsets {offsets!r}, not [begin, end] with 0 <= begin <= end")
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    if bits % 8 or bits // 8 != offsets[1] - offsets[0]:
        size = bits // 8 if bits % 8 == 0 else bits / 8
        raise _Bad(f"tensor '{name}' of shape {shape} and dtype {dtype} takes {size} bytes, "
                   f"but its data_offsets {offsets} span {offsets[1] - offsets[0]}")
    return TensorEntry(dtype, tuple(shape), offsets[0], offsets[1])


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_layout(tensors: dict[str, TensorEntry], data_size: int) -> None:
    """The tensors tile the data section, in offset order, with no gap, overlap or
    excess: what safetensors requires (a tensor past the end is a truncated file)."""
    position, previous = 0, None
    for name, t in sorted(tensors.items(), key=lambda item: (item[1].begin, item[1].end)):
        if t.end > data_size:
            raise _Bad(f"tensor '{name}' ends at data byte {t.end}, past the {data_size} bytes of data "
                       "the file has (it is cut short)")
        if t.begin < position:
            raise _Bad(f"tensor '{name}' (data bytes {t.begin}-{t.end}) overlaps tensor '{previous}'")
        if t.begin > position:
            raise _Bad(f"data bytes {position}-{t.begin} before tensor '{name}' belong to no tensor")
        position, previous = t.end, name
    if position != data_size:
        raise _Bad(f"its tensors cover {position} bytes of data, but the file has {data_size}")
