"""Checkpoints: HF safetensors directories, hub ids and GGUF files -> our model
(the way back, our model -> HF, is `mmpo_jax.models.hf_export`).

    model, cfg, tokenizer = load_checkpoint("HuggingFaceTB/SmolLM2-135M-Instruct", options, mesh=mesh)
    model, cfg, tokenizer = load_checkpoint("/models/llama-3.2-1b", options)          # HF directory
    model, cfg, tokenizer = load_checkpoint("/models/smollm2.Q4_1.gguf", options)     # GGUF file

Sources (`open_checkpoint` resolves one into a `CheckpointSource`):
- a local HF directory: `config.json` plus `model.safetensors`, or the shards of
  `model.safetensors.index.json` (or any `*.safetensors` files), and the tokenizer
  files if present;
- a hub id (`owner/name`): downloaded with `huggingface_hub.snapshot_download`
  (config, safetensors, tokenizer files only) into the HF cache, then read as a
  directory. Offline, or with the hub unreachable, the error says so and asks for
  a local path. `owner/name/file.gguf` downloads one GGUF file;
- a `.gguf` file (`mmpo_jax.models.gguf`): dequantised to float32, llama.cpp's q/k
  permutation undone, config and tokenizer (with chat template) from its metadata.

Each tensor is read lazily (safetensors through `safe_open`, GGUF through the
memory-mapped reader), converted once and placed straight onto its sharding by
`build_model`; at most one parameter's worth of tensors is held on the host.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import ml_dtypes
import numpy as np
from safetensors import safe_open

from mmpo_jax import storage
from mmpo_jax.config_schema import MODEL_DIM_LIMITS, model_dims_problem
from mmpo_jax.errors import UserError, first_line
from mmpo_jax.models.build import build_model
from mmpo_jax.models.decoder_config import DecoderConfig
from mmpo_jax.models.families import TEXT_TOWERS
from mmpo_jax.models.gguf import GGUFCheckpoint
from mmpo_jax.models.hf_config import text_config
from mmpo_jax.models.hf_weights import hf_weight_names
from mmpo_jax.models.options import ModelOptions
from mmpo_jax.models.safetensors_header import SafetensorsHeader, read_header
from mmpo_jax.paths import resolve

if TYPE_CHECKING:
    import jax

    from mmpo_jax.models.decoder import Decoder

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
# What a hub download fetches: enough to build the model and its tokenizer.
HUB_ALLOW_PATTERNS = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
]
# Only when a repository has no safetensors (see `_hub_download`).
HUB_BIN_PATTERNS = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_HUB_GGUF = re.compile(r"^([A-Za-z0-9][\w.\-]*/[\w.\-]+)/(.+\.gguf)$")


# --------------------------------------------------------------------------- #
# Sources
# --------------------------------------------------------------------------- #
@dataclass
class CheckpointSource:
    """A checkpoint before it becomes a model.

    `hf_config`: the transformers `config.json` dict; `get_tensor(hf_name)`: one
    tensor in transformers' layout (KeyError if absent); `names`: the tensors the
    source holds; `load_tokenizer()`: the tokenizer or None.
    """

    kind: str  # "hf" or "gguf"
    path: Path  # the directory (hf) or the file (gguf)
    hf_config: dict[str, Any]
    get_tensor: Callable[[str], np.ndarray]
    names: set[str]
    load_tokenizer: Callable[[], Any] = field(repr=False, default=lambda: None)

    @property
    def description(self) -> str:
        return f"{'GGUF file' if self.kind == 'gguf' else 'HF directory'} '{self.path}'"


def open_checkpoint(path_or_hub_id: str | os.PathLike) -> CheckpointSource:
    """Resolves a local directory, a `.gguf` file or a hub id into a `CheckpointSource`."""
    path = resolve_checkpoint_path(path_or_hub_id)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise UserError(
                f"'{path}' is a file but not a .gguf; pass an HF directory "
                "(config.json + *.safetensors) or a .gguf file"
            )
        return _open_gguf(path)
    return _open_hf_dir(path)


def resolve_checkpoint_path(path_or_hub_id: str | os.PathLike) -> Path:
    """A local path for a local path, or the downloaded snapshot for a hub id."""
    text = storage.fetched(resolve(os.fspath(path_or_hub_id)), "the model")
    if not text:
        raise UserError("no model path given; pass an HF directory, a .gguf file or a hub id")
    local = Path(text).expanduser()
    if local.exists():
        return local
    m = _HUB_GGUF.match(text)
    if m and not text.startswith((".", "/", "~")):
        return _hub_download_or_explain(text, local, m.group(1), filename=m.group(2))
    if _HUB_ID.match(text) and not text.lower().endswith((".gguf", ".json", ".safetensors")):
        return _hub_download_or_explain(text, local, text)
    raise UserError(
        f"no such file or directory: '{text}' (pass an HF directory with config.json and "
        "*.safetensors, a .gguf file, or a hub id like 'HuggingFaceTB/SmolLM2-135M-Instruct')"
    )


def _hub_download_or_explain(text: str, local: Path, repo_id: str, filename: str | None = None) -> Path:
    """`_hub_download`, its error led by the local path that does not exist: `models/x`
    is as likely a mistyped relative path as a hub id, and a message about the hub alone
    hides that the directory was looked for (and where)."""
    try:
        return _hub_download(repo_id, filename=filename)
    except UserError as err:
        raise UserError(
            f"no such local file or directory '{text}' (looked for {local.absolute()}), "
            f"and it could not be fetched from the hub as a hub id: {err}"
        ) from None


def _hub_download(repo_id: str, filename: str | None = None) -> Path:
    """Downloads (or finds in the HF cache) a hub model; errors say what to do instead."""
    try:  # lazy: only a hub id needs it, and the message below says what to install without it
        import huggingface_hub
        from huggingface_hub import errors as hf_errors  # lazy: as the line above
    except ImportError:  # pragma: no cover - a transformers dependency
        raise UserError(
            f"'{repo_id}' is not a local path, and downloading from the hub needs huggingface_hub"
        ) from None
    what = f"'{repo_id}'" + (f" file '{filename}'" if filename else "")
    unreachable = (
        f"cannot download {what}: the Hugging Face hub is unreachable (offline, no network, "
        "or HF_HUB_OFFLINE=1) and it is not in the local HF cache. Download it where there is "
        "network (e.g. `hf download {repo}`) and pass the local directory path "
        "(config.json + *.safetensors) or .gguf file instead of the hub id"
    ).replace("{repo}", repo_id)
    try:
        if filename is not None:
            return Path(huggingface_hub.hf_hub_download(repo_id, filename))
        path = Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=HUB_ALLOW_PATTERNS))
        if not any(path.glob("*.safetensors")):  # an older repository: PyTorch .bin weights
            path = Path(
                huggingface_hub.snapshot_download(
                    repo_id, allow_patterns=HUB_ALLOW_PATTERNS + HUB_BIN_PATTERNS
                )
            )
        return path
    except (hf_errors.OfflineModeIsEnabled, hf_errors.LocalEntryNotFoundError) as err:
        # (LocalEntryNotFoundError subclasses EntryNotFoundError: it must come first.)
        raise UserError(f"{unreachable} [{first_line(err)}]") from None
    except hf_errors.GatedRepoError as err:
        raise UserError(
            f"cannot download {what}: the repository is gated; accept its terms on the hub and "
            f"log in (`hf auth login` or HF_TOKEN), or pass a local path ({first_line(err)})"
        ) from None
    except (hf_errors.RepositoryNotFoundError, hf_errors.RevisionNotFoundError) as err:
        raise UserError(
            f"'{repo_id}' is not a model on the hub ({first_line(err)}); "
            "check the spelling, or pass a local HF directory or .gguf file"
        ) from None
    except hf_errors.EntryNotFoundError as err:
        raise UserError(f"cannot download {what}: no such file in the repository ({first_line(err)})") from None
    except hf_errors.HfHubHTTPError as err:
        raise UserError(f"cannot download {what}: {first_line(err)}; pass a local path instead") from None
    except (OSError, ConnectionError, TimeoutError) as err:
        raise UserError(f"{unreachable} [{type(err).__name__}: {first_line(err)}]") from None
    except Exception as err:  # httpx / requests transport errors and the like
        name = type(err).__name__
        if any(k in name for k in ("Connect", "Timeout", "Network", "Transport", "Proxy")):
            raise UserError(f"{unreachable} [{name}: {first_line(err)}]") from None
        raise


# ------------------------------------------------------------------- GGUF ---
def _open_gguf(path: Path) -> CheckpointSource:
    ckpt = GGUFCheckpoint(path)
    try:
        hf_config = ckpt.hf_config()
    except (ZeroDivisionError, TypeError, ValueError) as err:  # a head count of 0, a string size
        raise UserError(f"'{path}': GGUF metadata gives an unusable model dimension ({err}); "
                        "is this a complete llama.cpp model file?") from None
    arch = ckpt.architecture
    # the metadata keys the sizes came from, so the error names what is in the file
    names = {hf: f"{arch}.{key}" for hf, key in _GGUF_KEYS.items()
             if ckpt.metadata.get(f"{arch}.{key}") is not None}
    check_hf_dims(hf_config, str(path), names)

    def get(name: str) -> np.ndarray:
        if name not in ckpt._hf_to_gguf:
            raise KeyError(name)
        return ckpt.get_tensor(name)

    return CheckpointSource(
        kind="gguf",
        path=path,
        hf_config=hf_config,
        get_tensor=_ParamCache(get),
        names=set(ckpt.hf_names()),
        load_tokenizer=ckpt.tokenizer,
    )


# ------------------------------------------------------- model dimensions ---
# transformers' config.json name -> the GGUF metadata key (after `<arch>.`) it is read from
_GGUF_KEYS = {
    "hidden_size": "embedding_length",
    "num_hidden_layers": "block_count",
    "intermediate_size": "feed_forward_length",
    "num_attention_heads": "attention.head_count",
    "num_key_value_heads": "attention.head_count_kv",
    "head_dim": "attention.key_length",
    "vocab_size": "vocab_size",
    "max_position_embeddings": "context_length",
    "rope_theta": "rope.freq_base",
    "rms_norm_eps": "attention.layer_norm_rms_epsilon",
}


def check_hf_dims(hf_config: dict[str, Any], where: str, names: dict[str, str] | None = None) -> None:
    """A UserError naming `where` and the key when the model dimensions of a config.json
    dict are not usable: the rules of `model.init` (`mmpo_jax.config_schema.model_dims_problem`:
    positive integers below sane bounds, heads that divide). Checked before any array is
    built, so a bad file fails at once instead of in a JAX traceback or a hang.
    `names` maps a key to how the file calls it (GGUF metadata keys).
    """
    dims: dict[str, Any] = {key: hf_config.get(key) for key in MODEL_DIM_LIMITS}
    # `DecoderConfig.from_hf_dict` reads 0 / null for these as "not given" (`or` a derived value).
    for key in ("num_key_value_heads", "head_dim"):
        if not dims[key]:
            dims[key] = None
    for key in ("rope_theta", "rms_norm_eps", "sliding_window"):
        dims[key] = hf_config.get(key)
    rope_parameters = hf_config.get("rope_parameters")
    nested_theta = rope_parameters.get("rope_theta") if isinstance(rope_parameters, dict) else None
    problem = model_dims_problem(dims)
    if problem is None and nested_theta is not None:  # transformers 5 keeps rope_theta there
        nested = model_dims_problem({"rope_theta": nested_theta})
        if nested is not None:
            problem = ("rope_parameters.rope_theta", nested[1])
            dims["rope_parameters.rope_theta"] = nested_theta
    if problem is not None:
        key, rule = problem
        shown = (names or {}).get(key, key)
        raise UserError(f"'{where}': {shown}={dims[key]!r} {rule}")


# --------------------------------------------------------------- HF dirs ---
_ST_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U64": np.uint64,
    "U32": np.uint32,
    "U16": np.uint16,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def _ml_dtype(code: str) -> Any:
    table = {
        "BF16": ml_dtypes.bfloat16,
        "F8_E4M3": ml_dtypes.float8_e4m3fn,
        "F8_E5M2": ml_dtypes.float8_e5m2,
    }
    if code not in table:
        raise UserError(f"safetensors dtype {code} is not supported (supported: "
                        f"{', '.join([*_ST_DTYPES, *table])})")
    return table[code]


class SafetensorsReader:
    """Lazy reads from one or more safetensors files (`safe_open`, numpy).

    Every file's header is read and checked when the reader is made
    (`safetensors_header`), so a file that lies about its tensors is refused, naming
    it, before the model is built. numpy has no bfloat16, so `safe_open(framework=
    "numpy")` refuses BF16/F8 tensors; those are memory-mapped from the file with
    `ml_dtypes` instead.
    """

    def __init__(self, files: dict[str, Path], headers: dict[Path, SafetensorsHeader] | None = None):
        self.files = files  # tensor name -> file
        self._handles: dict[Path, Any] = {}
        self._headers = dict(headers or {})
        for path in set(files.values()) - set(self._headers):
            self._headers[path] = read_header(path)

    @classmethod
    def from_dir(cls, directory: Path) -> "SafetensorsReader":
        index = directory / SAFETENSORS_INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                shards = {str(name): directory / fname for name, fname in weight_map.items()}
            except (ValueError, KeyError, TypeError, AttributeError) as err:
                raise UserError(f"{index}: not a valid safetensors index ({err})") from None
            absent = sorted({str(p.name) for p in shards.values() if not p.is_file()})
            if absent:
                raise UserError(
                    f"{index} lists shard(s) that are missing: {', '.join(absent[:5])}"
                    f"{' ...' if len(absent) > 5 else ''}; download all the shards"
                )
            headers = {path: read_header(path) for path in set(shards.values())}
            for name, path in shards.items():
                if name not in headers[path].tensors:
                    raise UserError(f"{index} puts tensor '{name}' in '{path.name}', which does not hold it; "
                                    "download the index and the shards again")
            return cls(shards, headers)
        single = directory / SAFETENSORS_FILE
        candidates = [single] if single.is_file() else sorted(directory.glob("*.safetensors"))
        if not candidates:
            if any(directory.glob("pytorch_model*.bin")):
                return TorchBinReader.from_dir(directory)  # type: ignore[return-value]
            raise UserError(f"'{directory}' has no *.safetensors weights")
        headers = {path: read_header(path) for path in candidates}
        files = {name: path for path in candidates for name in headers[path].tensors}
        return cls(files, headers)

    def names(self) -> set[str]:
        return set(self.files)

    def get(self, name: str) -> np.ndarray:
        path = self.files[name]  # KeyError when absent
        header = self._headers[path]
        info = header.tensors[name]
        try:
            if info.dtype in _ST_DTYPES:
                if path not in self._handles:
                    self._handles[path] = safe_open(str(path), framework="numpy")
                return self._handles[path].get_tensor(name)
            dtype = np.dtype(_ml_dtype(info.dtype))
            arr = np.memmap(path, dtype=dtype, mode="r", offset=header.data_start + info.begin,
                            shape=(math.prod(info.shape),))
            return np.asarray(arr).reshape(info.shape)
        except UserError as err:
            raise UserError(f"'{path}': tensor '{name}': {err}") from None
        except Exception as err:  # SafetensorError, OSError, ValueError: the file changed since it was checked
            raise UserError(f"'{path}': cannot read tensor '{name}' ({type(err).__name__}: {first_line(err)}); "
                            "download or export it again") from None


class TorchBinReader:
    """Older checkpoints: `pytorch_model.bin` (or its sharded index), read with
    `torch.load(mmap=True, weights_only=True)` when torch is installed."""

    def __init__(self, files: dict[str, Path]):
        self.files = files
        self._loaded: dict[Path, Any] = {}

    @classmethod
    def from_dir(cls, directory: Path) -> "TorchBinReader":
        try:  # lazy: torch is optional (as every torch import here), needed only for .bin weights
            import torch  # noqa: F401
        except ImportError:
            raise UserError(
                f"'{directory}' has PyTorch .bin weights, which need torch to read; install torch, "
                "or convert them to safetensors with transformers "
                "(`from_pretrained(dir).save_pretrained(dir)`)"
            ) from None
        index = directory / "pytorch_model.bin.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            return cls({name: directory / fname for name, fname in weight_map.items()})
        files: dict[str, Path] = {}
        for path in sorted(directory.glob("pytorch_model*.bin")):
            for name in cls._load(path):
                files[name] = path
        return cls(files)

    @staticmethod
    def _load(path: Path) -> Any:
        import torch  # lazy: optional (see `from_dir`)

        try:
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:
            raise UserError(f"'{path}' is not a readable PyTorch checkpoint ({first_line(err)})") from None

    def names(self) -> set[str]:
        return set(self.files)

    def get(self, name: str) -> np.ndarray:
        import torch  # lazy: optional (see `from_dir`)

        path = self.files[name]  # KeyError when absent
        if path not in self._loaded:
            self._loaded = {path: self._load(path)}  # one shard open at a time
        t = self._loaded[path][name]
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()


def _open_hf_dir(directory: Path) -> CheckpointSource:
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        ggufs = sorted(directory.glob("*.gguf"))
        hint = f"; to load its GGUF file pass the file itself, e.g. '{ggufs[0]}'" if ggufs else ""
        raise UserError(f"'{directory}' has no config.json: not an HF model directory{hint}")
    try:
        hf_config = json.loads(config_path.read_text())
    except ValueError as err:
        raise UserError(f"{config_path}: not valid JSON ({err})") from None
    if not isinstance(hf_config, dict):
        raise UserError(f"{config_path}: expected a JSON object")
    check_hf_dims(text_config(hf_config), str(config_path))
    reader = SafetensorsReader.from_dir(directory)
    names = reader.names()
    alias = _text_tower_names(hf_config, names)

    def get(name: str) -> np.ndarray:
        if name in alias:
            return reader.get(alias[name])
        if name in names:
            return reader.get(name)
        # Checkpoints of the bare decoder (`LlamaModel`) have no `model.` prefix.
        if name.startswith("model.") and name[len("model."):] in names:
            return reader.get(name[len("model."):])
        raise KeyError(name)

    def tokenizer() -> Any:
        return load_hf_tokenizer(directory)

    available = names | set(alias) | {"model." + n for n in names if not n.startswith(("model.", "lm_head."))}
    return CheckpointSource(
        kind="hf",
        path=directory,
        hf_config=hf_config,
        get_tensor=_ParamCache(get),
        names=available,
        load_tokenizer=tokenizer,
    )


def _text_tower_names(hf_config: dict[str, Any], names: set[str]) -> dict[str, str]:
    """Our tensor name -> the file's, for a multimodal checkpoint whose text tower we
    load (`families.TEXT_TOWERS`: `model.language_model.*` or `language_model.model.*`
    for `model.*`); empty for any other checkpoint."""
    towers = TEXT_TOWERS.get(hf_config.get("model_type", "")) if "text_config" in hf_config else None
    alias: dict[str, str] = {}
    for ours, theirs in (towers or {}).items():
        for prefix in reversed(theirs):  # the first layout listed wins
            alias.update({ours + n[len(prefix):]: n for n in names if n.startswith(prefix)})
    return alias


def load_hf_tokenizer(directory: str | os.PathLike) -> Any:
    """The tokenizer saved in an HF directory, or None when it has no tokenizer files."""
    directory = Path(directory)
    if not any((directory / f).is_file() for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer  # lazy: transformers takes ~1 s to import; only a tokenizer needs it

    try:
        return AutoTokenizer.from_pretrained(str(directory))
    except Exception as err:  # a broken or exotic tokenizer must not block the model
        warnings.warn(f"'{directory}': cannot load its tokenizer ({first_line(err)}); going without")
        return None


class _ParamCache:
    """Wraps `get_tensor` so each tensor is read (and dequantised) once.

    `build_model` asks for a tensor once per device shard of its parameter (all
    layers of a stacked parameter each time), so the tensors of the parameter
    being built are kept: those of one name pattern (`model.layers.*.mlp.up_proj.weight`).
    Asking for another pattern drops them, so at most one parameter is on the host.
    """

    _LAYER = re.compile(r"\.layers\.\d+\.")

    def __init__(self, get: Callable[[str], np.ndarray]):
        self._get = get
        self._kind: str | None = None
        self._cache: dict[str, np.ndarray] = {}

    def __call__(self, name: str) -> np.ndarray:
        kind = self._LAYER.sub(".layers.*.", name)
        if kind != self._kind:
            self._cache.clear()
            self._kind = kind
        if name not in self._cache:
            self._cache[name] = self._get(name)
        return self._cache[name]

    def clear(self) -> None:
        self._cache.clear()
        self._kind = None


# --------------------------------------------------------------------------- #
# Loading
# --------------------------------------------------------------------------- #
def load_checkpoint(
    path_or_hub_id: str | os.PathLike,
    options: ModelOptions | None = None,
    *,
    mesh: jax.sharding.Mesh | None = None,
    with_tokenizer: bool = True,
) -> tuple[Decoder, DecoderConfig, Any]:
    """`(model, DecoderConfig, tokenizer or None)` from an HF directory, a hub id or a .gguf file.

    `options` is a `ModelOptions` (default: float32, scanned layers). With `mesh`,
    each parameter is placed straight onto its sharding (`mmpo_jax.sharding`).
    Raises `UserError` for a bad path, an unsupported architecture, or a missing or
    misshaped tensor, saying what to fix.
    """
    source = open_checkpoint(path_or_hub_id)
    try:
        cfg = DecoderConfig.from_hf_dict(source.hf_config)
    except UserError as err:
        raise UserError(f"{source.description}: {err}") from None
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"{source.description}: config.json is missing or has a bad {err}") from None
    check_tensors(source, cfg)
    options = ModelOptions() if options is None else options
    try:
        model = build_model(cfg, options, mesh=mesh, get_tensor=source.get_tensor)
    except UserError as err:
        raise UserError(f"{source.description}: {err}") from None
    finally:
        clear = getattr(source.get_tensor, "clear", None)
        if clear is not None:
            clear()
    tokenizer = source.load_tokenizer() if with_tokenizer else None
    return model, cfg, tokenizer


def check_tensors(source: CheckpointSource, cfg: DecoderConfig) -> None:
    """Every tensor the architecture needs is in the checkpoint, or a UserError listing those missing."""
    missing = [n for n in hf_weight_names(cfg) if n not in source.names]
    if missing:
        shown = ", ".join(missing[:6]) + (f" ... ({len(missing)} in all)" if len(missing) > 6 else "")
        hint = ""
        if missing == ["lm_head.weight"]:
            hint = " (if the LM head is the embedding, set tie_word_embeddings: true in config.json)"
        raise UserError(
            f"{source.description} lacks tensors its config.json implies: {shown}{hint}; "
            "is config.json the one that belongs to these weights?"
        )
