"""One checkpoint in our model and in transformers' PyTorch model, compared
(`mmpo-jax compare --model`): the batch (a JSON lines file, random tokens or a built-in
chat sample), both sides' per-token log-probs and, optionally, the gradients of the
summed sequence log-probs, and the largest differences. See `mmpo_jax.commands.compare`
for what a user asks and reads."""

from __future__ import annotations

import contextlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmpo_jax.data.tokenizers import tokenizer_of
from mmpo_jax.errors import UserError, first_line
from mmpo_jax.logprobs import model_token_logps
from mmpo_jax.models.hf_export import export_hf
from mmpo_jax.models.hf_weights import iter_hf_weights
from mmpo_jax.models.options import ModelOptions
from mmpo_jax.models.pretrained import load_checkpoint, open_checkpoint
from mmpo_jax.train.run_restore import restore_inference

if TYPE_CHECKING:
    from mmpo_jax.models.decoder import Decoder
    from mmpo_jax.models.decoder_config import DecoderConfig

SAMPLE_CHATS = (
    ("What is the capital of France?", "The capital of France is Paris."),
    (
        "Explain in one sentence why the sky is blue.",
        "Sunlight scatters off the molecules of the air, and blue light, with its shorter "
        "wavelength, scatters the most.",
    ),
    ("Write a haiku about the sea.", "Waves fold into foam,\nsalt wind carries gull voices,\nthe tide keeps its time."),
    (
        "Give me three tips for learning a new language.",
        "1. Practise a little every day.\n2. Talk with native speakers early.\n"
        "3. Learn the most common words first.",
    ),
)
DEFAULT_RANDOM_LENGTH = 32


@dataclass(frozen=True)
class ModelComparison:
    """What to compare: the checkpoint (`model`: an HF directory, a hub id, a `.gguf`
    file or a run directory) and the batch (`data` a JSON lines file, or `random_tokens`
    rows of that length, or neither: the built-in chat sample)."""

    model: str
    data: str | None = None
    random_tokens: int | None = None
    max_examples: int = 8
    max_length: int = 256
    chunk: int = 64
    seed: int = 0
    grads: bool = False
    torch_dtype: str = "float32"


# --------------------------------------------------------------------------- #
# The batch
# --------------------------------------------------------------------------- #
@dataclass
class Batch:
    """Right-padded token ids `[B, T]`, the valid-token mask and the completion mask
    (both aligned with the ids: position t is the log-prob of token t, t >= 1)."""

    ids: np.ndarray
    valid: np.ndarray
    completion: np.ndarray
    source: str

    @property
    def lengths(self) -> np.ndarray:
        return self.valid.sum(axis=1)


def _pad(rows: list[tuple[list[int], int]], pad_id: int, source: str) -> Batch:
    """rows: (ids, prompt_len) -> Batch; completion = positions >= max(prompt_len, 1)."""
    t = max(len(ids) for ids, _ in rows)
    ids = np.full((len(rows), t), pad_id, dtype=np.int32)
    valid = np.zeros((len(rows), t), dtype=bool)
    completion = np.zeros((len(rows), t), dtype=bool)
    for i, (row, prompt_len) in enumerate(rows):
        ids[i, : len(row)] = row
        valid[i, 1 : len(row)] = True  # position 0 is not predicted
        completion[i, max(prompt_len, 1) : len(row)] = True
    return Batch(ids, valid, completion, source)


def random_batch(vocab_size: int, length: int, seed: int, pad_id: int) -> Batch:
    if length < 2:
        raise UserError(f"--random-tokens {length}: needs at least 2 tokens")
    rng = np.random.default_rng(seed)
    lengths = [length, max(2, 3 * length // 4), max(2, length // 2), length]
    rows = [(rng.integers(0, vocab_size, size=n).tolist(), 0) for n in lengths]
    return _pad(rows, pad_id, f"random-tokens:{length}")


def _ids(encoded: Any) -> list[int]:
    """Token ids from whatever a tokenizer call or apply_chat_template returned."""
    if hasattr(encoded, "keys"):
        encoded = encoded["input_ids"]
    return [int(i) for i in encoded]


def _render(tokenizer: Any, prompt: Any, answer: Any) -> tuple[list[int], int]:
    """(ids, prompt length) of prompt + answer; lists of messages go through the chat template."""
    if isinstance(prompt, list) or isinstance(answer, list):
        prompt_msgs = prompt if isinstance(prompt, list) else ([{"role": "user", "content": prompt}] if prompt else [])
        answer_msgs = answer if isinstance(answer, list) else [{"role": "assistant", "content": answer}]
        if getattr(tokenizer, "chat_template", None):
            full = _ids(tokenizer.apply_chat_template(prompt_msgs + answer_msgs, tokenize=True))
            if prompt_msgs:
                head = _ids(tokenizer.apply_chat_template(prompt_msgs, tokenize=True, add_generation_prompt=True))
            else:
                head = []
            n = 0
            while n < min(len(head), len(full)) and head[n] == full[n]:
                n += 1
            return full, n
        # No chat template: "role: content" lines.
        prompt = "".join(f"{m['role']}: {m['content']}\n" for m in prompt_msgs) + "assistant: "
        answer = "".join(str(m["content"]) for m in answer_msgs)
    prompt = "" if prompt is None else str(prompt)
    head = _ids(tokenizer(prompt)) if prompt else []
    tail = _ids(tokenizer(str(answer), add_special_tokens=not prompt))
    return head + tail, len(head)


def _records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    if not path.is_file():
        raise UserError(f"--data: no such file '{path}'")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as err:
                raise UserError(f"{path}:{lineno}: not valid JSON ({err})") from None
            if not isinstance(record, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            yield lineno, record


def data_batch(tokenizer: Any, path: Path, max_examples: int, max_length: int, pad_id: int) -> Batch:
    if tokenizer is None:
        raise UserError(
            f"--data {path}: the checkpoint has no tokenizer to tokenize texts; use --random-tokens LEN"
        )
    rows: list[tuple[list[int], int]] = []
    for lineno, rec in _records(path):
        pairs: list[tuple[Any, Any]]  # (prompt or None, answer): text or chat messages
        if "text" in rec:
            pairs = [(None, rec["text"])]
        elif "messages" in rec and isinstance(rec["messages"], list) and rec["messages"]:
            pairs = [(rec["messages"][:-1], rec["messages"][-1:])]
        elif "prompt" in rec and ("chosen" in rec or "completion" in rec):
            answers = [rec[k] for k in ("completion", "chosen", "rejected") if k in rec]
            pairs = [(rec["prompt"], a) for a in answers]
        elif "chosen" in rec:  # implicit prompt: whole conversations
            pairs = [(None, rec[k]) for k in ("chosen", "rejected") if k in rec]
        else:
            raise UserError(
                f"{path}:{lineno}: expected 'text', 'messages', 'prompt'+'completion', or "
                f"'prompt'+'chosen'(+'rejected'); got keys {sorted(rec)}"
            )
        for prompt, answer in pairs:
            if isinstance(answer, list) and prompt is None:  # a whole conversation
                prompt, answer = answer[:-1], answer[-1:]
            try:
                ids, n = _render(tokenizer, prompt, answer)
            except Exception as err:  # a chat template refusing the messages, a bad field type
                raise UserError(f"{path}:{lineno}: cannot tokenize this record: {first_line(err)}") from None
            ids = ids[:max_length]
            if len(ids) >= 2:
                rows.append((ids, min(n, len(ids))))
        if len(rows) >= max_examples:
            break
    if not rows:
        raise UserError(f"--data {path}: no record gave a sequence of 2 or more tokens")
    return _pad(rows[:max_examples], pad_id, f"data:{path}")


def sample_batch(tokenizer: Any, max_examples: int, max_length: int, pad_id: int) -> Batch:
    rows = []
    for prompt, answer in SAMPLE_CHATS[:max_examples]:
        ids, n = _render(tokenizer, [{"role": "user", "content": prompt}], answer)
        ids = ids[:max_length]
        if len(ids) >= 2:
            rows.append((ids, min(n, len(ids))))
    template = "chat template" if getattr(tokenizer, "chat_template", None) else "no chat template"
    return _pad(rows, pad_id, f"builtin-chat-sample ({template})")


def build_batch(args: ModelComparison, tokenizer: Any, vocab_size: int, pad_id: int) -> tuple[Batch, list[str]]:
    notes: list[str] = []
    if args.random_tokens is not None:
        return random_batch(vocab_size, args.random_tokens, args.seed, pad_id), notes
    if args.data:
        batch = data_batch(tokenizer, Path(args.data), args.max_examples, args.max_length, pad_id)
        if batch.ids.max() >= vocab_size:
            raise UserError(
                f"the tokenizer gives token id {int(batch.ids.max())}, outside the model's vocabulary "
                f"({vocab_size}); use --random-tokens LEN"
            )
        return batch, notes
    if tokenizer is None:
        notes.append("the checkpoint has no tokenizer: random tokens")
        return random_batch(vocab_size, DEFAULT_RANDOM_LENGTH, args.seed, pad_id), notes
    try:
        batch = sample_batch(tokenizer, args.max_examples, args.max_length, pad_id)
    except Exception as err:  # a tokenizer or template that cannot render the sample
        notes.append(f"the tokenizer cannot render the chat sample ({err}): random tokens")
        return random_batch(vocab_size, DEFAULT_RANDOM_LENGTH, args.seed, pad_id), notes
    if batch.ids.max() >= vocab_size:
        notes.append("the tokenizer's ids exceed the model's vocabulary: random tokens")
        return random_batch(vocab_size, DEFAULT_RANDOM_LENGTH, args.seed, pad_id), notes
    return batch, notes


# --------------------------------------------------------------------------- #
# The two sides
# --------------------------------------------------------------------------- #
def ours_logps(model: Decoder, batch: Batch, chunk: int, grads: bool) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Per-token log-probs `[B, T]` (aligned with the ids) and, with `grads`, the
    gradient of the summed completion log-probs per transformers tensor name."""
    ids = jnp.asarray(batch.ids)
    completion = jnp.asarray(batch.completion)

    def total(m: Decoder) -> tuple[jax.Array, jax.Array]:
        lp = model_token_logps(m, ids, chunk=chunk)
        assert not isinstance(lp, tuple)  # no entropy asked for: the log-probs alone
        return jnp.sum(jnp.where(completion, lp, 0.0)), lp

    with jax.default_matmul_precision("highest"):
        if not grads:
            logps = nnx.jit(lambda m: model_token_logps(m, ids, chunk=chunk))(model)
            return np.asarray(logps, dtype=np.float64), {}
        g, logps = nnx.jit(nnx.grad(total, has_aux=True))(model)
    graphdef, _, *rest = nnx.split(model, nnx.Param, ...)
    grad_model = nnx.merge(graphdef, g, *rest)
    out = {name: np.asarray(a, dtype=np.float64) for name, a in iter_hf_weights(grad_model)}
    return np.asarray(logps, dtype=np.float64), out


def load_torch_model(source: Any, dtype: str = "float32") -> Any:
    """transformers' model of the checkpoint, float32 (or float64), eager attention, CPU."""
    try:
        # lazy: torch and transformers are optional (the `torch` extra), needed only here
        import torch
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging
    except ImportError as err:
        raise UserError(f"compare needs torch and transformers ({err}); pip install 'mmpo-jax[torch]'") from None
    hf_logging.set_verbosity_error()
    with contextlib.suppress(Exception):
        hf_logging.disable_progress_bar()
    torch_dtype = getattr(torch, dtype)
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "attn_implementation": "eager"}
    try:
        if source.kind == "gguf":
            model = AutoModelForCausalLM.from_pretrained(
                str(source.path.parent), gguf_file=source.path.name, **kwargs
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(str(source.path), **kwargs)
    except Exception as err:
        raise UserError(
            f"transformers cannot load {source.description}: {type(err).__name__}: {first_line(err)}"
        ) from None
    # No `.float()`: transformers refuses it on a GGUF-loaded model ("quantized"); dtype= did it.
    bad = sorted({str(p.dtype) for p in model.parameters() if p.dtype != torch_dtype})
    if bad:
        raise UserError(f"transformers loaded {source.description} with dtypes {bad}, not {dtype}")
    return model.eval()


def torch_logps(model: Any, batch: Batch, grads: bool) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    import torch  # lazy: optional (the `torch` extra); `load_torch_model` has checked it is there

    ids = torch.as_tensor(batch.ids, dtype=torch.long)
    valid_tok = torch.zeros_like(ids)
    for i, n in enumerate(batch.valid.sum(axis=1)):
        valid_tok[i, : int(n) + 1] = 1
    completion = torch.as_tensor(batch.completion)
    with torch.set_grad_enabled(grads):
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids, attention_mask=valid_tok, use_cache=False).logits
        if logits.dtype != torch.float64:
            logits = logits.float()  # log-softmax in float32, as ours
        logp_all = torch.log_softmax(logits[:, :-1], dim=-1)
        tok = torch.gather(logp_all, -1, ids[:, 1:, None])[..., 0]
        logps = torch.cat([torch.zeros_like(tok[:, :1]), tok], dim=1)  # aligned with ids
        out: dict[str, np.ndarray] = {}
        if grads:
            torch.where(completion, logps, torch.zeros_like(logps)).sum().backward()
            for name, p in model.named_parameters():
                if p.grad is not None:
                    out[name] = p.grad.detach().double().numpy()
    return logps.detach().double().numpy(), out


def compare(args: ModelComparison) -> dict[str, Any]:
    """Runs the comparison; returns the JSON-able result."""
    if args.max_examples < 1 or args.max_length < 2 or args.chunk < 1:
        raise UserError("--max-examples must be >= 1, --max-length >= 2 and --chunk >= 1")
    if args.data and not Path(args.data).is_file():
        raise UserError(f"--data: no such file '{args.data}'")
    with contextlib.ExitStack() as stack:
        if is_run_dir(args.model):
            model, cfg, tokenizer, source = _run_dir_and_export(args.model, stack)
        else:
            source = open_checkpoint(args.model)
            options = ModelOptions(
                param_dtype="float32", compute_dtype="float32", attention="xla", scan_layers=True, remat="none"
            )
            try:
                model, cfg, tokenizer = load_checkpoint(source.path, options)
            except UserError:
                raise
            except Exception as err:
                raise UserError(f"cannot load {source.description}: {type(err).__name__}: {first_line(err)}") from None
        return _compare_loaded(args, model, cfg, tokenizer, source)


def is_run_dir(path: str) -> bool:
    """A `train.output_dir` of `mmpo-jax train` (its config and checkpoints)."""
    p = Path(path).expanduser()
    return (p / "config.yaml").is_file() and (p / "checkpoints").is_dir()


def _run_dir_and_export(run_dir: str, stack: contextlib.ExitStack) -> tuple[Any, Any, Any, Any]:
    """Our policy of the run's latest checkpoint (float32, LoRA adapters as they are), and its
    `mmpo-jax export` in a temporary directory, which transformers loads on the other side."""
    trainer, _ = restore_inference(run_dir, ["model.compute_dtype=float32", "model.attention=xla"])
    if trainer.cfg.model.param_dtype != "float32":
        raise UserError(f"{run_dir}: compare reads float32 runs (model.param_dtype={trainer.cfg.model.param_dtype})")
    model = trainer.sdef.policy(trainer.state)
    tokenizer = tokenizer_of(trainer.cfg.data, trainer.cfg.model.path)
    tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="mmpo-compare-export-"))
    export_hf(model, trainer.arch, tokenizer, tmp)
    return model, trainer.arch, tokenizer, open_checkpoint(tmp)


def _compare_loaded(args: ModelComparison, model: Decoder, cfg: DecoderConfig, tokenizer: Any, source: Any) -> dict[str, Any]:
    pad_id = cfg.pad_token_id if isinstance(cfg.pad_token_id, int) and 0 <= cfg.pad_token_id < cfg.vocab_size else 0
    batch, notes = build_batch(args, tokenizer, cfg.vocab_size, pad_id)
    if source.kind == "gguf" and cfg.rope_type == "llama3":
        notes.append(
            "llama3 RoPE scaling read from rope_freqs.weight; transformers' GGUF loader ignores "
            "that tensor, so differences are expected"
        )
    torch_model = load_torch_model(source, args.torch_dtype)

    ours, ours_g = ours_logps(model, batch, args.chunk, args.grads)
    ref, ref_g = torch_logps(torch_model, batch, args.grads)

    valid, completion = batch.valid, batch.completion
    token_diff = np.abs(ours - ref)[valid]
    seq_ours = np.where(completion, ours, 0.0).sum(axis=1)
    seq_ref = np.where(completion, ref, 0.0).sum(axis=1)
    result: dict[str, Any] = {
        "max_abs_token_logp_diff": float(token_diff.max()) if token_diff.size else 0.0,
        "max_abs_seq_logp_diff": float(np.abs(seq_ours - seq_ref).max()),
        "mean_abs_token_logp_diff": float(token_diff.mean()) if token_diff.size else 0.0,
        "mean_token_logp": float(ref[valid].mean()) if token_diff.size else 0.0,
        "seq_logps_ours": [float(x) for x in seq_ours],
        "seq_logps_torch": [float(x) for x in seq_ref],
        "num_sequences": int(batch.ids.shape[0]),
        "num_tokens": int(valid.sum()),
        "num_completion_tokens": int(completion.sum()),
        "batch": batch.source,
        "model": str(args.model),
        "format": source.kind,
        "model_type": cfg.model_type,
        "jax_backend": jax.default_backend(),
        "torch_dtype": args.torch_dtype,
    }
    if args.grads:
        rel: dict[str, float] = {}
        missing = sorted(set(ours_g) ^ set(ref_g))
        # transformers builds nn.Embedding(padding_idx=pad_token_id), whose lookup gives
        # that row no gradient even where the token occurs (SmolLM2's pad is <|im_end|>).
        pad_row = getattr(torch_model.get_input_embeddings(), "padding_idx", None)
        if pad_row is not None and "model.embed_tokens.weight" in ours_g and (batch.ids == pad_row).any():
            notes.append(
                f"row {pad_row} (padding_idx) of model.embed_tokens.weight left out of the gradient "
                "comparison: transformers' nn.Embedding(padding_idx=...) gives it no gradient"
            )
        for name in sorted(set(ours_g) & set(ref_g)):
            a, b = ours_g[name], ref_g[name]
            if name == "model.embed_tokens.weight" and pad_row is not None:
                a, b = np.delete(a, pad_row, axis=0), np.delete(b, pad_row, axis=0)
            if a.shape != b.shape:
                raise UserError(f"gradient of '{name}': shape {a.shape} (ours) vs {b.shape} (transformers)")
            scale = float(np.abs(b).max())
            diff = float(np.abs(a - b).max())
            rel[name] = diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))
        worst = max(rel, key=lambda name: rel[name]) if rel else None
        result["max_rel_grad_diff"] = float(rel[worst]) if worst else 0.0
        result["worst_grad_tensor"] = worst
        result["grad_tensors_compared"] = len(rel)
        if missing:
            notes.append(f"tensors with a gradient on one side only: {', '.join(missing[:5])}")
    if notes:
        result["notes"] = notes
    return result
