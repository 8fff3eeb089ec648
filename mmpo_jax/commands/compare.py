"""`mmpo-jax compare --model PATH [--data FILE.jsonl | --random-tokens LEN] [--grads] [--json]`
or `mmpo-jax compare --config CONFIG --step [--json] [key=value ...]` (one train step: see
`mmpo_jax/commands/compare_step.py`).

Loads one checkpoint (an HF directory, a hub id or a `.gguf` file) twice: into
our JAX model (`mmpo_jax.models.checkpoints.load_checkpoint`) and into
transformers' PyTorch model (`AutoModelForCausalLM.from_pretrained`; for a GGUF
file transformers' own GGUF loader, an import independent of ours), both in
float32, runs the same right-padded batch through both, and prints the largest
absolute differences of the per-token log-probs (every predicted token) and of the
sequence log-probs (sum over the completion tokens); with `--grads`, the largest
over parameter tensors of `max|g_ours - g_torch| / max|g_torch|` for the gradient
of the summed sequence log-probs.

The batch:
- `--data FILE.jsonl`: one JSON object per line, in any of these forms (TRL's
  preference and language-modelling formats):
  `{"text": ...}` (all tokens are the completion); `{"prompt": ..., "completion": ...}`;
  `{"prompt": ..., "chosen": ..., "rejected": ...}` (two sequences: prompt+chosen,
  prompt+rejected; `rejected` optional); `{"messages": [...]}` (the last message is
  the completion). Prompts and answers are strings, or lists of chat messages
  (`{"role", "content"}`) rendered with the tokenizer's chat template.
- `--random-tokens LEN`: random token ids of the model's vocabulary, rows of
  lengths LEN, 3/4 LEN, 1/2 LEN, LEN (right-padded).
- neither: a built-in sample of chat prompts and answers rendered with the chat
  template, or random tokens (length 32) when the checkpoint has no tokenizer.

`--torch-dtype float64` runs transformers' side in float64: the differences are
then our float32 error against near-exact values.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from mmpo_jax.errors import UserError

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


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="compare our model with transformers' PyTorch model on one checkpoint",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", metavar="PATH", help="HF directory, hub id or .gguf file")
    p.add_argument("--config", metavar="CONFIG", help="with --step: the run config whose first train step is compared")
    p.add_argument("--step", action="store_true",
                   help="compare one train step (loss, metrics, gradients) of --config against PyTorch")
    p.add_argument("--lora-b-std", type=float, default=0.02, metavar="STD",
                   help="with --step and LoRA: set the B matrices to normal(0, STD) first, since B = 0 "
                        "hides A's gradient (0 keeps the init; default 0.02)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="with --step: config overrides")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", metavar="FILE.jsonl", help="texts or preference records, one JSON per line")
    src.add_argument("--random-tokens", type=int, metavar="LEN", help="random token ids, rows up to LEN long")
    p.add_argument("--grads", action="store_true", help="also compare the gradients of the summed sequence log-probs")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--max-examples", type=int, default=8, metavar="N", help="sequences at most (default 8)")
    p.add_argument("--max-length", type=int, default=256, metavar="N", help="tokens per sequence at most (default 256)")
    p.add_argument("--chunk", type=int, default=64, help="sequence positions per LM-head chunk (default 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random tokens")
    p.add_argument(
        "--torch-dtype",
        choices=("float32", "float64"),
        default="float32",
        help="dtype of transformers' side (float64: measure our float32 error against near-exact values)",
    )
    p.set_defaults(func=run)


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
                raise UserError(f"{path}:{lineno}: cannot tokenize this record: {_one_line(err)}") from None
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


def build_batch(args: argparse.Namespace, tokenizer: Any, vocab_size: int, pad_id: int) -> tuple[Batch, list[str]]:
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
def ours_logps(model: Any, batch: Batch, chunk: int, grads: bool) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Per-token log-probs `[B, T]` (aligned with the ids) and, with `grads`, the
    gradient of the summed completion log-probs per transformers tensor name."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from mmpo_jax.logprobs import model_token_logps
    from mmpo_jax.models.hf_weights import iter_hf_weights

    ids = jnp.asarray(batch.ids)
    completion = jnp.asarray(batch.completion)

    def total(m):
        lp = model_token_logps(m, ids, chunk=chunk)
        return jnp.sum(jnp.where(completion, lp, 0.0)), lp

    with jax.default_matmul_precision("highest"):
        if not grads:
            logps = nnx.jit(lambda m: model_token_logps(m, ids, chunk=chunk))(model)
            return np.asarray(logps, dtype=np.float64), {}
        g, logps = nnx.jit(nnx.grad(total, has_aux=True))(model)
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    grad_model = nnx.merge(graphdef, g, rest)
    out = {name: np.asarray(a, dtype=np.float64) for name, a in iter_hf_weights(grad_model)}
    return np.asarray(logps, dtype=np.float64), out


def load_torch_model(source: Any, dtype: str = "float32") -> Any:
    """transformers' model of the checkpoint, float32 (or float64), eager attention, CPU."""
    try:
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
            f"transformers cannot load {source.description}: {type(err).__name__}: {_one_line(err)}"
        ) from None
    # No `.float()`: transformers refuses it on a GGUF-loaded model ("quantized"); dtype= did it.
    bad = sorted({str(p.dtype) for p in model.parameters() if p.dtype != torch_dtype})
    if bad:
        raise UserError(f"transformers loaded {source.description} with dtypes {bad}, not {dtype}")
    return model.eval()


def torch_logps(model: Any, batch: Batch, grads: bool) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    import torch

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


# --------------------------------------------------------------------------- #
# The command
# --------------------------------------------------------------------------- #
def _one_line(err: BaseException) -> str:
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


@contextlib.contextmanager
def _stdout_to_stderr(active: bool) -> Iterator[None]:
    """Keeps stdout for the JSON: whatever libraries print goes to stderr."""
    if not active:
        yield
        return
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no real fd 1
        with contextlib.redirect_stdout(sys.stderr):
            yield
        return
    try:
        os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def compare(args: argparse.Namespace) -> dict[str, Any]:
    """Runs the comparison; returns the JSON-able result."""
    from mmpo_jax.models.checkpoints import load_checkpoint, open_checkpoint
    from mmpo_jax.models.options import ModelOptions

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
                raise UserError(f"cannot load {source.description}: {type(err).__name__}: {_one_line(err)}") from None
        return _compare_loaded(args, model, cfg, tokenizer, source)


def is_run_dir(path: str) -> bool:
    """A `train.output_dir` of `mmpo-jax train` (its config and checkpoints)."""
    p = Path(path).expanduser()
    return (p / "config.yaml").is_file() and (p / "checkpoints").is_dir()


def _run_dir_and_export(run_dir: str, stack: contextlib.ExitStack) -> tuple[Any, Any, Any, Any]:
    """Our policy of the run's latest checkpoint (float32, LoRA adapters as they are), and its
    `mmpo-jax export` in a temporary directory, which transformers loads on the other side."""
    import tempfile

    from mmpo_jax.data.tokenizers import load_tokenizer
    from mmpo_jax.models.checkpoints import open_checkpoint
    from mmpo_jax.models.hf_export import export_hf
    from mmpo_jax.train.loop import restore_run

    trainer, _ = restore_run(run_dir, ["model.compute_dtype=float32", "model.attention=xla"])
    if trainer.cfg.model.param_dtype != "float32":
        raise UserError(f"{run_dir}: compare reads float32 runs (model.param_dtype={trainer.cfg.model.param_dtype})")
    model = trainer.sdef.policy(trainer.state)
    tokenizer = load_tokenizer(trainer.cfg.data.tokenizer)
    tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="mmpo-compare-export-"))
    export_hf(model, trainer.arch, tokenizer, tmp)
    return model, trainer.arch, tokenizer, open_checkpoint(tmp)


def _compare_loaded(args: argparse.Namespace, model: Any, cfg: Any, tokenizer: Any, source: Any) -> dict[str, Any]:
    import jax

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
        worst = max(rel, key=rel.get) if rel else None
        result["max_rel_grad_diff"] = float(rel[worst]) if worst else 0.0
        result["worst_grad_tensor"] = worst
        result["grad_tensors_compared"] = len(rel)
        if missing:
            notes.append(f"tensors with a gradient on one side only: {', '.join(missing[:5])}")
    if notes:
        result["notes"] = notes
    return result


def run(args: argparse.Namespace) -> int:
    if args.step or args.config:
        return run_step(args)
    if not args.model:
        raise UserError("compare needs --model PATH, or --config CONFIG --step")
    if args.overrides:
        raise UserError(f"key=value overrides ({args.overrides[0]}) apply to --config --step only")
    with _stdout_to_stderr(args.json):
        result = compare(args)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"== compare: {result['model']} ({result['format']}, {result['model_type']}) ==")
    print(f"  batch: {result['batch']}: {result['num_sequences']} sequences, "
          f"{result['num_tokens']} predicted tokens, {result['num_completion_tokens']} completion tokens")
    rows = [
        ("max |token logp diff|", result["max_abs_token_logp_diff"]),
        ("mean |token logp diff|", result["mean_abs_token_logp_diff"]),
        ("max |sequence logp diff|", result["max_abs_seq_logp_diff"]),
        ("mean token logp (torch)", result["mean_token_logp"]),
    ]
    if "max_rel_grad_diff" in result:
        rows.append((f"max rel grad diff ({result['worst_grad_tensor']})", result["max_rel_grad_diff"]))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"  {key:<{width}}  {value: .3e}")
    print("  sequence logps (ours | torch):")
    for a, b in zip(result["seq_logps_ours"], result["seq_logps_torch"]):
        print(f"    {a: .6f} | {b: .6f}")
    for note in result.get("notes", []):
        print(f"  note: {note}")
    return 0


def run_step(args: argparse.Namespace) -> int:
    from mmpo_jax.torch_ref.compare_step import compare_step

    if not (args.step and args.config):
        raise UserError("a train-step comparison needs both --config CONFIG and --step")
    if args.model:
        raise UserError("--model and --config --step are two different comparisons: give one")
    with _stdout_to_stderr(args.json):
        result = compare_step(args.config, args.overrides, args.lora_b_std, args.seed)
    if args.json:
        print(json.dumps(result))
    else:
        print_result(result)
    return 0


def print_result(result: dict[str, Any]) -> None:
    """`compare --step`'s result in lines for a reader."""
    print(f"== compare --step: {result['loss']['name']} (reference {result['reference']}, "
          f"{'LoRA' if result['lora'] else 'full fine-tuning'}), {result['pairs']} pairs x {result['seq']} "
          f"tokens, grad_accum {result['grad_accum']}, mesh {result['mesh']} ==")
    print(f"  loss ours {result['loss_ours']:.8g}  torch {result['loss_torch']:.8g}  "
          f"|diff| {result['loss_abs_diff']:.3e}")
    print(f"  max rel grad diff {result['max_rel_grad_diff']:.3e} ({result['worst_grad_tensor']}; "
          f"{result['grad_tensors_compared']} tensors)")
    for k, v in result["metric_abs_diffs"].items():
        print(f"  |diff| {k:28s} {v:.3e}")
    for note in result.get("notes", []):
        print(f"  note: {note}")
