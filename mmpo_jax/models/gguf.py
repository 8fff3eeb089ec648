"""GGUF (llama.cpp) files -> transformers-layout tensors, an HF config dict and a tokenizer.

Read with the `gguf` package's numpy reader: the file is memory-mapped and each
tensor is dequantised (`gguf.quants.dequantize`) only when it is asked for, so a
load touches one tensor at a time. Supported architectures: `llama` (Llama
1/2/3, SmolLM2, Mistral: llama.cpp files Mistral as `llama`) and `qwen2`.

llama.cpp stores the q/k projections of `llama` files with their rows permuted
(its RoPE rotates adjacent pairs, transformers' rotates halves): `unpermute_qk`
undoes that. `qwen2` files are not permuted.

A `llama` file converted from a Llama-3 checkpoint with `rope_scaling` of type
`llama3` keeps the scaling only as a `rope_freqs.weight` tensor of per-frequency
factors; `llama3_rope_scaling_from_factors` recovers transformers' parameters
from it (transformers' own GGUF loader ignores that tensor).
"""

from __future__ import annotations

import functools

import re
from pathlib import Path
from typing import Any, Callable

import gguf
import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType
from gguf.quants import dequantize

from mmpo_jax.config_schema import MODEL_DIM_LIMITS
from mmpo_jax.errors import UserError
from mmpo_jax.models.decoder_config import DecoderConfig
from mmpo_jax.models.families import FAMILIES
from mmpo_jax.models.hf_weights import hf_weight_names

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3")

# our GGUF architectures -> the gguf package's MODEL_ARCH member (its tensor-name map
# says where each transformers tensor lives in the file) and the config.json model type
_ARCHS = {"llama": ("LLAMA", "llama"), "qwen2": ("QWEN2", "qwen2"), "qwen3": ("QWEN3", "qwen3")}
# Tensors that carry no weights of their own: consumed into the config, or unused.
_IGNORED = {"rope_freqs.weight"}
_IGNORED_LAYER = {"attn_rot_embd"}

_GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# llama.cpp's `tokenizer.ggml.pre` -> the regex splits that precede byte-level BPE
# (from llama.cpp's llama-vocab.cpp). Unknown names fall back to GPT-2's split.
_PRE_SPLITS: dict[str, tuple[str, ...]] = {
    "default": (_GPT2_SPLIT,),
    "gpt-2": (_GPT2_SPLIT,),
    "smollm": (r"\p{N}", _GPT2_SPLIT),
    "starcoder": (r"\p{N}", _GPT2_SPLIT),
    "refact": (r"\p{N}", _GPT2_SPLIT),
    "llama3": (_LLAMA3_SPLIT,),
    "llama-v3": (_LLAMA3_SPLIT,),
    "llama-bpe": (_LLAMA3_SPLIT,),
    "smaug-bpe": (_LLAMA3_SPLIT,),
    "dbrx": (_LLAMA3_SPLIT,),
    "falcon3": (_LLAMA3_SPLIT,),
    "pixtral": (_LLAMA3_SPLIT,),
    "qwen2": (_QWEN2_SPLIT,),
    "deepseek-r1-qwen": (_QWEN2_SPLIT,),
    "megrez": (_QWEN2_SPLIT,),
}

_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4


# --------------------------------------------------------------------------- #
# Pure helpers (testable without a file)
# --------------------------------------------------------------------------- #
def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undoes llama.cpp's row permutation of a q/k projection (weight `[out, in]` or bias `[out]`).

    llama.cpp's `convert_hf_to_gguf.py` applies, per head of `2 * half` rows,
    `w.reshape(n_head, 2, half, ...).swapaxes(1, 2)`; this is its inverse. `n_head`
    is the number of heads the tensor holds (query heads for q, kv heads for k).
    """
    half = w.shape[0] // n_head // 2
    if n_head * 2 * half != w.shape[0]:
        raise UserError(
            f"cannot un-permute a q/k tensor of {w.shape[0]} rows for {n_head} heads "
            "(rows must be a multiple of 2 x heads)"
        )
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's permutation (`LlamaModel.permute` in convert_hf_to_gguf.py); for tests."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(
    head_dim: int,
    rope_theta: float,
    factor: float,
    low_freq_factor: float,
    high_freq_factor: float,
    original_max_position_embeddings: int,
    rotary_dim: int | None = None,
) -> np.ndarray:
    """The per-frequency divisors llama.cpp stores as `rope_freqs.weight` (transformers' llama3 rule)."""
    dim = rotary_dim or head_dim
    inv_freq = 1.0 / rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    wavelen = 2 * np.pi / inv_freq
    low_wavelen = original_max_position_embeddings / low_freq_factor
    high_wavelen = original_max_position_embeddings / high_freq_factor
    smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (
        high_freq_factor - low_freq_factor
    )
    factors = 1.0 / ((1 - smooth) / factor + smooth)
    factors = np.where(wavelen < high_wavelen, 1.0, factors)
    factors = np.where(wavelen > low_wavelen, factor, factors)
    return factors


def llama3_rope_scaling_from_factors(
    factors: np.ndarray, head_dim: int, rope_theta: float
) -> dict[str, Any] | None:
    """transformers' `rope_scaling` of type `llama3` that gives llama.cpp's `rope_freqs` factors.

    Returns None when all factors are 1 (no scaling). The usual Llama-3.1/3.2
    parameters (low 1, high 4, original context 8192) are tried first; otherwise
    the smooth band is fitted (only the ratios matter, so the original context is
    fixed at 8192). Raises UserError if no llama3 rule reproduces the factors.
    """
    factors = np.asarray(factors, dtype=np.float64).reshape(-1)
    if np.allclose(factors, 1.0, rtol=0, atol=1e-6):
        return None
    factor = float(factors.max())
    dim = 2 * factors.size
    candidates = [(1.0, 4.0, 8192)]
    # Fit: inside the band, s = 1/(1/f - ...) is linear in 1/wavelen with slope
    # orig/(h - l) and intercept -l/(h - l).
    inv_freq = 1.0 / rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    wavelen = 2 * np.pi / inv_freq
    band = (factors > 1.0 + 1e-6) & (factors < factor - 1e-6 * factor)
    if band.sum() >= 2 and factor > 1:
        s = (1.0 / factors[band] - 1.0 / factor) / (1.0 - 1.0 / factor)
        slope, intercept = np.polyfit(1.0 / wavelen[band], s, 1)
        if slope > 0:
            orig = 8192
            width = orig / slope  # h - l
            low = -intercept * width
            if low > 0:
                candidates.append((float(low), float(low + width), orig))
    for low, high, orig in candidates:
        params: dict[str, Any] = dict(
            factor=factor,
            low_freq_factor=low,
            high_freq_factor=high,
            original_max_position_embeddings=orig,
        )
        expect = llama3_rope_factors(head_dim, rope_theta, rotary_dim=dim, **params)
        if np.allclose(expect, factors, rtol=1e-4, atol=1e-5):
            return {"rope_type": "llama3", **params}
    raise UserError(
        "the GGUF's rope_freqs.weight does not follow transformers' llama3 RoPE scaling; "
        "convert the original HF checkpoint instead"
    )


# --------------------------------------------------------------------------- #
# The file
# --------------------------------------------------------------------------- #
def _field_value(field: Any) -> Any:
    """A metadata value as Python: str, int, float, bool, or a list of those."""
    types = list(field.types)
    if not types:
        return None

    def scalar(part: np.ndarray, vtype: Any) -> Any:
        if vtype == GGUFValueType.STRING:
            return bytes(part).decode("utf-8", errors="replace")
        value = part.tolist()
        value = value[0] if isinstance(value, list) else value
        if vtype == GGUFValueType.BOOL:
            return bool(value)
        return value

    if types[0] == GGUFValueType.ARRAY:
        sub = types[-1]
        if sub == GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
        if sub == GGUFValueType.ARRAY:
            return None  # nested arrays: not used here
        out: list[Any] = []
        for i in field.data:
            values = field.parts[i].tolist()
            out.extend(values if isinstance(values, list) else [values])
        return [bool(v) for v in out] if sub == GGUFValueType.BOOL else out
    return scalar(field.parts[field.data[0]], types[0])


@functools.lru_cache(maxsize=2)
def _read_gguf(path: str, mtime_ns: int, size: int) -> tuple[Any, dict[str, Any]]:
    """`(GGUFReader, metadata)` of one file, kept for the process: a run reads the same
    GGUF for its tokenizer and for its weights, and parsing it costs ~20 s (49k
    vocabulary strings for SmolLM2). The reader memory-maps the file, so keeping it
    holds no tensor data; `mtime_ns` and `size` key the cache so a rewritten file is
    read anew."""
    try:
        reader = GGUFReader(path)
    except Exception as err:
        raise UserError(f"'{path}' is not a readable GGUF file: {err}") from None
    metadata: dict[str, Any] = {}
    for name, field in reader.fields.items():
        try:
            metadata[name] = _field_value(field)
        except Exception:  # an exotic field we do not need
            continue
    return reader, metadata


class GGUFCheckpoint:
    """One GGUF file: metadata, a transformers-layout tensor getter, config and tokenizer.

    `get_tensor(hf_name)` dequantises one tensor to float32 in transformers' layout
    (Linear weights `[out, in]`), with llama.cpp's q/k permutation undone.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"no such GGUF file: '{self.path}'")
        stat = self.path.stat()
        self._reader, metadata = _read_gguf(str(self.path.resolve()), stat.st_mtime_ns, stat.st_size)
        self.metadata: dict[str, Any] = dict(metadata)
        self.tensors = {t.name: t for t in self._reader.tensors}
        self.architecture = str(self.metadata.get("general.architecture", "?"))
        self._check_supported()

    # ----------------------------------------------------------------- metadata
    def _arch(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(f"{self.architecture}.{key}", default)

    def _check_supported(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise UserError(
                f"'{self.path}': GGUF architecture '{self.architecture}' is not supported "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)}); convert the model to an HF "
                "directory (config.json + safetensors) instead"
            )
        if (self._arch("expert_count") or 0) > 0:
            raise UserError(
                f"'{self.path}': a mixture-of-experts GGUF ({self._arch('expert_count')} experts) "
                "is not supported; only dense Llama-family models are"
            )

    def _heads(self) -> tuple[int, int]:
        def one(value: Any, name: str) -> int:
            if isinstance(value, list):
                if len(set(value)) != 1:
                    raise UserError(f"'{self.path}': per-layer {name} {value} is not supported")
                value = value[0]
            return int(value)

        n_head = self._arch("attention.head_count")
        if n_head is None:
            raise UserError(f"'{self.path}': metadata lacks {self.architecture}.attention.head_count")
        n_head = one(n_head, "head counts")
        n_kv = one(self._arch("attention.head_count_kv", n_head), "kv head counts")
        return n_head, n_kv

    def hf_config(self) -> dict[str, Any]:
        """A transformers `config.json` dict for the model in the file."""
        need = {
            "embedding_length": "hidden_size",
            "block_count": "num_hidden_layers",
            "feed_forward_length": "intermediate_size",
        }
        missing = [f"{self.architecture}.{k}" for k in need if self._arch(k) is None]
        if missing:
            raise UserError(f"'{self.path}': GGUF metadata lacks {', '.join(missing)}")
        n_head, n_kv = self._heads()
        hidden = int(self._arch("embedding_length"))
        head_dim = self._arch("attention.key_length")
        head_dim = int(head_dim) if head_dim else hidden // n_head
        embed = self.tensors.get("token_embd.weight")
        vocab = self._arch("vocab_size")
        if vocab is None and embed is not None:
            vocab = int(embed.shape[-1])  # ggml order: [hidden, vocab]
        if vocab is None:
            vocab = len(self.metadata.get("tokenizer.ggml.tokens") or [])
        rope_theta = float(str(np.float32(self._arch("rope.freq_base", 10000.0))))
        model_type = _ARCHS[self.architecture][1]
        cfg: dict[str, Any] = {
            "architectures": [FAMILIES[model_type].architecture],
            "model_type": model_type,
            "vocab_size": int(vocab),
            "hidden_size": hidden,
            "intermediate_size": int(self._arch("feed_forward_length")),
            "num_hidden_layers": int(self._arch("block_count")),
            "num_attention_heads": n_head,
            "num_key_value_heads": n_kv,
            "head_dim": head_dim,
            # float32 in the file: its shortest repr (1e-05, not 9.999999747378752e-06)
            "rms_norm_eps": float(str(np.float32(self._arch("attention.layer_norm_rms_epsilon", 1e-5)))),
            "rope_theta": rope_theta,
            "max_position_embeddings": int(self._arch("context_length", 4096)),
            "tie_word_embeddings": "output.weight" not in self.tensors,
            "attention_bias": "blk.0.attn_q.bias" in self.tensors,
            "hidden_act": "silu",
            "rope_scaling": self._rope_scaling(head_dim, rope_theta),
        }
        if self.architecture in ("qwen2", "qwen3"):
            cfg["use_sliding_window"] = False
        if self.architecture == "qwen2":
            cfg.pop("attention_bias")  # Qwen2 always has q/k/v biases
        for key, meta in (
            ("bos_token_id", "tokenizer.ggml.bos_token_id"),
            ("eos_token_id", "tokenizer.ggml.eos_token_id"),
            ("pad_token_id", "tokenizer.ggml.padding_token_id"),
        ):
            if self.metadata.get(meta) is not None:
                cfg[key] = int(self.metadata[meta])
        return cfg

    def _rope_scaling(self, head_dim: int, rope_theta: float) -> dict[str, Any] | None:
        kind = self._arch("rope.scaling.type")
        factor = self._arch("rope.scaling.factor")
        if kind == "linear" and factor:
            return {"rope_type": "linear", "factor": float(factor)}
        if kind not in (None, "none", "linear"):
            raise UserError(f"'{self.path}': RoPE scaling '{kind}' is not supported (llama3, linear are)")
        if "rope_freqs.weight" in self.tensors:
            factors = self._dequantize(self.tensors["rope_freqs.weight"])
            return llama3_rope_scaling_from_factors(factors, head_dim, rope_theta)
        return None

    # ------------------------------------------------------------------ tensors
    @functools.cached_property
    def _hf_to_gguf(self) -> dict[str, str]:
        """transformers name -> GGUF name, for every tensor of the file (unknown ones
        refused), from the gguf package's tensor-name map of the architecture. Built on
        first use, after the metadata's sizes are checked: the map has one entry per
        block and tensor kind, so an absurd block count must stop before it."""
        blocks = int(self._arch("block_count") or 0)
        if not 0 < blocks <= MODEL_DIM_LIMITS["num_hidden_layers"]:
            raise UserError(f"'{self.path}': {self.architecture}.block_count={blocks} must be in "
                            f"1..{MODEL_DIM_LIMITS['num_hidden_layers']}")
        arch = getattr(gguf.MODEL_ARCH, _ARCHS[self.architecture][0])
        names = gguf.get_tensor_name_map(arch, blocks)
        try:
            cfg = DecoderConfig.from_hf_dict(self.hf_config())
        except (KeyError, TypeError, ValueError) as err:
            raise UserError(f"'{self.path}': GGUF metadata is missing or has a bad {err}") from None
        out: dict[str, str] = {}
        for hf_name in hf_weight_names(cfg) + ["lm_head.weight"]:
            found = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if found is not None and found in self.tensors:
                out[hf_name] = found
        layer_re = re.compile(r"^blk\.\d+\.([^.]+)")
        known = set(out.values()) | _IGNORED
        unknown = [n for n in self.tensors if n not in known
                   and not ((m := layer_re.match(n)) and m.group(1) in _IGNORED_LAYER)]
        if unknown:
            shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
            raise UserError(
                f"'{self.path}': tensors this {self.architecture} import does not know: {shown}"
            )
        return out

    def hf_names(self) -> list[str]:
        return sorted(self._hf_to_gguf)

    def _dequantize(self, tensor: Any) -> np.ndarray:
        shape = tuple(int(d) for d in reversed(list(tensor.shape)))  # ggml order is reversed
        try:
            if tensor.tensor_type == GGMLQuantizationType.BF16:
                raw = np.asarray(tensor.data).view(np.uint16).astype(np.uint32) << 16
                out = raw.view(np.float32)
            else:
                out = dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError:
            raise UserError(
                f"'{self.path}': tensor {tensor.name} has type {tensor.tensor_type.name}, which the "
                "gguf package cannot dequantise; use a file with another quantisation"
            ) from None
        return np.ascontiguousarray(np.asarray(out, dtype=np.float32).reshape(shape))

    def get_tensor(self, hf_name: str) -> np.ndarray:
        """One tensor, dequantised to float32, in transformers' layout."""
        gguf_name = self._hf_to_gguf.get(hf_name)
        if gguf_name is None:
            raise UserError(f"'{self.path}': the GGUF file has no tensor for '{hf_name}'")
        w = self._dequantize(self.tensors[gguf_name])
        if self.architecture == "llama" and (".attn_q." in gguf_name or ".attn_k." in gguf_name):
            n_head, n_kv = self._heads()
            w = unpermute_qk(w, n_head if ".attn_q." in gguf_name else n_kv)
        return w

    def tensor_getter(self) -> Callable[[str], np.ndarray]:
        return self.get_tensor

    # ---------------------------------------------------------------- tokenizer
    def tokenizer(self) -> Any:
        """The tokenizer (with chat template) stored in the file, or None if it has none.

        Byte-level BPE vocabularies (`tokenizer.ggml.model = gpt2`: Llama 3, SmolLM2,
        Qwen2) are built here with the `tokenizers` library; others (sentencepiece
        `llama`) go through transformers' own GGUF tokenizer conversion.
        """
        model = self.metadata.get("tokenizer.ggml.model")
        tokens = self.metadata.get("tokenizer.ggml.tokens")
        if not tokens or model is None:
            return None
        if model == "gpt2":
            tok = self._byte_level_bpe()
        else:
            # lazy: transformers takes ~1 s to import, and only a GGUF's tokenizer needs it
            from transformers import PreTrainedTokenizerFast

            try:
                tok = PreTrainedTokenizerFast.from_pretrained(
                    str(self.path.parent), gguf_file=self.path.name
                )
            except Exception as err:
                raise UserError(
                    f"'{self.path}': cannot build its '{model}' tokenizer: {err}"
                ) from None
        template = self.metadata.get("tokenizer.chat_template")
        if template:
            tok.chat_template = template
        return tok

    def _special(self, key: str) -> str | None:
        tokens = self.metadata["tokenizer.ggml.tokens"]
        idx = self.metadata.get(f"tokenizer.ggml.{key}")
        return tokens[idx] if idx is not None and 0 <= idx < len(tokens) else None

    def _byte_level_bpe(self) -> Any:
        # lazy: with transformers (see `tokenizer`); `tokenizers` is its backend
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
        from transformers import PreTrainedTokenizerFast  # lazy: as the line above

        tokens: list[str] = self.metadata["tokenizer.ggml.tokens"]
        types = self.metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        merges = [tuple(m.split(" ", 1)) for m in self.metadata.get("tokenizer.ggml.merges") or []]
        vocab: dict[str, int] = {}
        for i, t in enumerate(tokens):
            vocab.setdefault(t, i)
        backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
        splits = _PRE_SPLITS.get(str(self.metadata.get("tokenizer.ggml.pre", "default")), (_GPT2_SPLIT,))
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(s), behavior="isolated") for s in splits]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
        backend.decoder = decoders.ByteLevel()
        special = [
            AddedToken(t, special=True, normalized=False)
            for t, kind in zip(tokens, types)
            if kind == _TOKEN_CONTROL
        ]
        user = [
            AddedToken(t, special=False, normalized=False)
            for t, kind in zip(tokens, types)
            if kind == _TOKEN_USER_DEFINED
        ]
        backend.add_special_tokens(special)
        if user:
            backend.add_tokens(user)
        bos = self._special("bos_token_id")
        eos = self._special("eos_token_id")
        add_bos = bool(self.metadata.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
        add_eos = bool(self.metadata.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
        if add_bos or add_eos:
            single = ([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else [])
            pair = single + ([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else [])
            specials = [(t, vocab[t]) for t in {bos if add_bos else None, eos if add_eos else None} if t]
            backend.post_processor = processors.TemplateProcessing(
                single=" ".join(single), pair=" ".join(pair), special_tokens=specials
            )
        else:
            backend.post_processor = processors.ByteLevel(trim_offsets=False)
        return PreTrainedTokenizerFast(
            tokenizer_object=backend,
            bos_token=bos,
            eos_token=eos,
            unk_token=self._special("unknown_token_id"),
            pad_token=self._special("padding_token_id"),
            clean_up_tokenization_spaces=False,
        )
