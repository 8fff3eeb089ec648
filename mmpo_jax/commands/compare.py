"""`mmpo-jax compare --model PATH [--data FILE.jsonl | --random-tokens LEN] [--grads] [--json]`
or `mmpo-jax compare --config CONFIG --step [--json] [key=value ...]` (one train step: see
`mmpo_jax/torch_ref/compare_step.py`; the model comparison is
`mmpo_jax/torch_ref/compare_model.py`).

Loads one checkpoint (an HF directory, a hub id or a `.gguf` file) twice: into
our JAX model (`mmpo_jax.models.pretrained.load_checkpoint`) and into
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
import dataclasses
import json
import os
import sys
from typing import Any, Iterator

from mmpo_jax.errors import UserError


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


def run(args: argparse.Namespace) -> int:
    # lazy: the comparison imports jax and the model (torch only as it runs), which `--help` does not need
    from mmpo_jax.torch_ref.compare_model import ModelComparison, compare

    if args.step or args.config:
        return run_step(args)
    if not args.model:
        raise UserError("compare needs --model PATH, or --config CONFIG --step")
    if args.overrides:
        raise UserError(f"key=value overrides ({args.overrides[0]}) apply to --config --step only")
    with _stdout_to_stderr(args.json):
        result = compare(ModelComparison(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ModelComparison)}))
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
    from mmpo_jax.torch_ref.compare_step import compare_step  # lazy: as in `run`

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
