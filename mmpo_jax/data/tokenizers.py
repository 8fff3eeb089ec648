"""Tokenizers by spec (`data.tokenizer`, with `data.chat_template`), their special ids, and a
content fingerprint.

A spec is one of (`mmpo_jax.config` settles an unset `data.tokenizer` to `model.path`, or
to builtin:tiny for a random init):
- `builtin:NAME`: a tokenizer shipped with the package (`builtin:tiny`, a small
  byte-level BPE with a chat template, see `mmpo_jax.data.builtin`);
- a path ending in `.gguf`: the tokenizer (and chat template) stored in a
  llama.cpp file, built by `mmpo_jax.models.gguf`;
- a local tokenizer directory, or a hub id, loaded by `AutoTokenizer`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from mmpo_jax import storage
from mmpo_jax.config import BUILTIN_PREFIX
from mmpo_jax.config_schema import DataConfig
from mmpo_jax.data.builtin import builtin_tokenizer_dir
from mmpo_jax.data.formats import SpecialIds
from mmpo_jax.data.tokenizer_protocol import Tokenizer
from mmpo_jax.errors import UserError, first_line
from mmpo_jax.models.gguf import GGUFCheckpoint
from mmpo_jax.paths import resolve


def tokenizer_of(data: DataConfig, model_path: str = "") -> Tokenizer:
    """The run's tokenizer: `data.tokenizer`, with `data.chat_template` in place of its own
    template when set. `model_path` (the run's `model.path`) only words the error of a
    checkpoint that carries no tokenizer."""
    try:
        tokenizer = load_tokenizer(data.tokenizer)
    except UserError as err:
        if model_path and data.tokenizer == model_path:
            raise UserError(f"{err}. data.tokenizer is unset, so the tokenizer of model.path is used: if that "
                            "checkpoint has none, set data.tokenizer to the model's tokenizer") from None
        raise
    if data.chat_template is not None:
        tokenizer.chat_template = chat_template_text(data.chat_template)
    return tokenizer


def chat_template_text(spec: str, key: str = "data.chat_template") -> str:
    """The Jinja text of `spec`: the text itself when it holds a Jinja tag, else a file's content."""
    if "{{" in spec or "{%" in spec:
        return spec
    path = Path(storage.fetched(resolve(spec), key)).expanduser()
    if not path.is_file():
        raise UserError(f"{key}: no such file '{spec}' (a template given as text holds '{{{{' or '{{%')")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{key}: cannot read '{spec}' ({first_line(err)})") from None
    if "{{" not in text and "{%" not in text:
        raise UserError(f"{key}: '{spec}' holds no Jinja template (no '{{{{' or '{{%' in it)")
    return text


def load_tokenizer(spec: str, key: str = "data.tokenizer") -> Tokenizer:
    """The transformers tokenizer named by `spec`; a UserError naming `key` if it cannot load."""
    # lazy: transformers takes seconds to import; only the commands that tokenize need it
    from transformers import AutoTokenizer

    if spec.startswith(BUILTIN_PREFIX):
        name = spec[len(BUILTIN_PREFIX) :]
        try:
            path = builtin_tokenizer_dir(name)
        except (UserError, KeyError, ValueError, FileNotFoundError) as err:
            raise UserError(f"{key}={spec!r}: {err}") from None
        return AutoTokenizer.from_pretrained(str(path))
    spec = storage.fetched(resolve(spec), key)
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise UserError(f"{key}: no such file '{spec}'")
        tok = GGUFCheckpoint(path).tokenizer()
        if tok is None:
            raise UserError(
                f"{key}: '{spec}' stores no tokenizer; name a tokenizer directory instead"
            )
        return tok
    if path.is_file():
        raise UserError(
            f"{key}: '{spec}' is a file; name a tokenizer directory, a .gguf file or builtin:tiny"
        )
    try:
        return AutoTokenizer.from_pretrained(str(path) if path.is_dir() else spec)
    except Exception as err:  # OSError, ValueError, HTTP errors: all mean "cannot load this"
        what = "the directory" if path.is_dir() else "no such directory, and the hub id"
        raise UserError(f"{key}: cannot load tokenizer '{spec}' ({what} failed: {first_line(err)})") from None


def special_ids(tokenizer: Tokenizer, where: str = "data.tokenizer") -> SpecialIds:
    """EOS (required), the pad id (the tokenizer's, else EOS, as TRL does) and BOS (or None)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError(f"{where}: the tokenizer has no EOS token; completions must end with one")
    pad = tokenizer.pad_token_id
    return SpecialIds(
        eos=int(eos), pad=int(eos if pad is None else pad), bos=tokenizer.bos_token_id
    )


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """A hash of everything that decides token ids: vocabulary, merges, pre/post
    processing, special tokens and the chat template (not the path it came from)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        body = backend.to_str()
    else:  # a slow (Python) tokenizer
        # lazy: datasets takes seconds to import, and only a slow tokenizer needs its hasher
        from datasets.fingerprint import Hasher

        body = Hasher.hash(tokenizer)
    meta = {
        "class": type(tokenizer).__name__,
        "chat_template": tokenizer.chat_template,
        "special": [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id],
    }
    digest = hashlib.sha256(body.encode())
    digest.update(json.dumps(meta, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:32]
