"""`mmpo-jax generate CONFIG|RUN_DIR --prompts FILE [--out FILE] [options] [key=value ...]`.

Continues every prompt of FILE with the model and writes one JSON line per prompt, in
the file's order: the input row with every field kept, plus `response` (the generated
text without the prompt and without the EOS; special tokens dropped) and `num_tokens`
(the response's tokens). To stdout, or to `--out`; progress goes to stderr.

The model: with a run directory, the policy of its latest checkpoint (under the run's
own config, overrides applied); with a config, its `model.path` (or the random init of
`model.init` when it is ""). The tokenizer is `data.tokenizer`; the model is sharded on
the `mesh.*` mesh as in training.

FILE is JSON lines (or a .json list of objects) with a `prompt` field per row: a list
of `{"role", "content"}` messages (the tokenizer's chat template with the generation
prompt) or a string. A string goes by `--prompt-format`: `auto` (the default) makes it
one user message, `[{"role": "user", "content": PROMPT}]`, through the chat template
when the tokenizer has one (a chat model such as SmolLM2-Instruct given bare text
often answers nothing), else `raw`; `chat` always does (an error for a tokenizer
without a template); `raw` tokenizes the text as it is, as the data pipeline tokenizes
a standard prompt (for a base model, or a model trained on standard-format data).
Preference data (`prompt`, `chosen`, `rejected`, e.g. the demo data
`mmpo_jax/data/demo/conversational/test.jsonl`) works as it is: only `prompt` is read.

Decoding stops at an EOS (the tokenizer's, the model config's `eos_token_id` and a
`generation_config.json`'s beside the weights) or after `--max-new-tokens`.
`--temperature 0` (the default) is greedy; above 0 it samples, from the `--top-p`
nucleus, reproducibly for a `--seed` (a prompt's sample does not depend on
`--batch-size`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from mmpo_jax.config import load_config, split_config_and_overrides
from mmpo_jax.data.json_rows import read_json_rows
from mmpo_jax.errors import UserError

# mmpo_jax.eval.generate.PROMPT_FORMATS, spelled out: importing that module (jax, flax) here
# would slow every `mmpo-jax --help`
PROMPT_FORMATS = ("auto", "chat", "raw")
# No model reads more positions (config_schema.MODEL_DIM_LIMITS' max_position_embeddings):
# a larger value is a typo, refused before the model is loaded.
MAX_NEW_TOKENS = 2**24


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate responses to a JSONL file of prompts with a config's or run's model",
                       description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", metavar="CONFIG|RUN_DIR")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--prompts", required=True, metavar="FILE", help="JSONL rows with a 'prompt' field")
    p.add_argument("--out", metavar="FILE", help="write the JSONL here (default: stdout)")
    p.add_argument("--max-new-tokens", type=int, default=256, metavar="N",
                   help="most tokens generated per prompt (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P",
                   help="nucleus sampling: keep the most likely tokens up to this probability mass (default 1)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="sampling seed (default 0)")
    p.add_argument("--batch-size", type=int, default=8, metavar="B", help="prompts per batch (default 8)")
    p.add_argument("--prompt-format", choices=PROMPT_FORMATS, default="auto",
                   help="string prompts: chat = one user message through the chat template, raw = the text "
                        "as it is, auto (default) = chat when the tokenizer has a chat template, else raw; "
                        "message-list prompts always use the template")
    p.set_defaults(func=run)


def check_args(args: argparse.Namespace) -> None:
    """Option values before anything is loaded: a UserError naming the bad one."""
    if not 1 <= args.max_new_tokens <= MAX_NEW_TOKENS:
        raise UserError(f"--max-new-tokens {args.max_new_tokens}: must be in [1, {MAX_NEW_TOKENS}] (and fit the "
                        "model's positions with the prompt)")
    if not args.temperature >= 0:
        raise UserError(f"--temperature {args.temperature}: must be >= 0 (0 = greedy)")
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top-p {args.top_p}: must be in (0, 1]")
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: must be >= 1")
    path = Path(args.prompts)
    if not path.exists():
        raise UserError(f"--prompts: no such file '{args.prompts}'")
    if not path.is_file():
        raise UserError(f"--prompts: '{args.prompts}' is not a file")
    if path.suffix.lower() not in (".jsonl", ".json"):
        raise UserError(f"--prompts: '{args.prompts}' is not a .jsonl or .json file")
    if args.out and Path(args.out).resolve() == path.resolve():
        raise UserError(f"--out '{args.out}' is the --prompts file: write the output elsewhere")


def check_context(prompts: list[list[int]], where: list[str], max_new_tokens: int, context: int) -> None:
    """Every prompt and its answer must fit the model's positions: past them RoPE reads
    positions it never saw, and the KV cache is sized prompt + max_new_tokens (a warning
    used to let --max-new-tokens 1e8 go on to allocate it)."""
    longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
    n = len(prompts[longest])
    if n >= context:
        raise UserError(f"{where[longest]}: the prompt is {n} tokens, and the model reads {context} positions "
                        "(max_position_embeddings, with any RoPE scaling): shorten it")
    if n + max_new_tokens > context:
        raise UserError(f"--max-new-tokens {max_new_tokens}: the longest prompt ({n} tokens, {where[longest]}) "
                        f"and its answer would pass the model's {context} positions: use --max-new-tokens "
                        f"<= {context - n}")


def read_prompt_rows(path: str) -> tuple[list[dict[str, Any]], list[str]]:
    """`(rows, where)`: the rows of the prompts file (the data pipeline's JSON reader, so a
    malformed line is reported with its number) and a name of each for errors. Every row
    must have a `prompt` (its value is checked when tokenized)."""
    raw = read_json_rows(Path(path), "--prompts")
    if not raw.rows:
        raise UserError(f"--prompts: '{path}' has no rows")
    where = [f"--prompts: '{path}' {raw.label} {n}" for n in raw.numbers]
    for w, row in zip(where, raw.rows):
        if row.get("prompt") is None:
            fields = ", ".join(row) or "none"
            raise UserError(f"{w}: no 'prompt' field (fields: {fields}); each row needs a prompt to continue")
    return raw.rows, where


def load_policy(args: argparse.Namespace) -> tuple[Any, Any, Any, str]:
    """`(model, architecture, run config, description)` of CONFIG or RUN_DIR."""
    # lazy: the restore and the model import jax, which `mmpo-jax --help` does not need
    from mmpo_jax.train.run_restore import names_a_run, restore_inference
    from mmpo_jax.train.setup import build_policy

    if names_a_run(args.target):
        run, step = restore_inference(args.target, args.overrides)  # the policy alone
        return run.sdef.policy(run.state), run.arch, run.cfg, f"{args.target} (step {step})"
    if not Path(args.target).exists():
        raise UserError(f"no such config file or run directory '{args.target}'")
    path, overrides = split_config_and_overrides([args.target, *args.overrides])
    cfg = load_config(path, overrides)
    model, arch, _ = build_policy(cfg)
    what = cfg.model.path or "the random init of model.init"
    return model, arch, cfg, f"{args.target} ({what})"


def run(args: argparse.Namespace) -> int:
    # lazy: jax, the tokenizers and the generation code, which `mmpo-jax --help` does not need
    import jax

    from mmpo_jax.data.tokenizers import special_ids, tokenizer_of
    from mmpo_jax.eval.generate import (
        GenerationConfig,
        eos_ids,
        generate,
        generation_config_eos,
        tokenize_prompts,
        uses_chat_template,
    )
    from mmpo_jax.train.setup import check_vocab

    check_args(args)
    rows, where = read_prompt_rows(args.prompts)
    model, arch, cfg, what = load_policy(args)
    tokenizer = tokenizer_of(cfg.data, cfg.model.path)
    check_vocab(tokenizer, arch, cfg)
    if args.prompt_format == "chat" and not getattr(tokenizer, "chat_template", None):
        raise UserError(f"--prompt-format chat: data.tokenizer={cfg.data.tokenizer!r} has no chat template; "
                        "use --prompt-format raw (or auto), or a data.tokenizer with a chat template")
    as_chat = uses_chat_template(tokenizer, args.prompt_format)
    prompts = tokenize_prompts(tokenizer, [r["prompt"] for r in rows], where, prompt_format=args.prompt_format)
    config = GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        eos_ids=eos_ids(tokenizer, arch, generation_config_eos(cfg.model.path)),
        pad_id=special_ids(tokenizer).pad,
        temperature=args.temperature,
        top_p=args.top_p,
    )
    lead = jax.process_index() == 0

    def say(text: str) -> None:
        if lead:
            print(f"generate: {text}", file=sys.stderr, flush=True)

    check_context(prompts, where, args.max_new_tokens, arch.context_length)
    strings = "string prompts as one user message of the chat template" if as_chat else "string prompts as raw text"
    say(f"{len(rows)} prompts from {args.prompts} ({strings}), model {what}, EOS ids {list(config.eos_ids)}, "
        f"{'greedy' if config.greedy else f'temperature {config.temperature}, top-p {config.top_p}'}")
    out = None
    if lead:
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        out = open(args.out, "w", encoding="utf-8") if args.out else sys.stdout
    start, tokens = time.perf_counter(), 0
    try:
        for first in range(0, len(rows), args.batch_size):
            idx = range(first, min(first + args.batch_size, len(rows)))
            gen = generate(model, [prompts[i] for i in idx], config, seed=args.seed, row_ids=list(idx),
                           batch_rows=args.batch_size)
            for j, i in enumerate(idx):
                ids = gen.response_ids(j)
                tokens += len(ids)
                record = {**rows[i], "response": tokenizer.decode(ids, skip_special_tokens=True),
                          "num_tokens": len(ids)}
                if out is not None:
                    out.write(json.dumps(record, ensure_ascii=False) + "\n")
            if out is not None:
                out.flush()
            seconds = time.perf_counter() - start
            say(f"{idx[-1] + 1}/{len(rows)} prompts, {tokens} tokens, {seconds:.1f} s "
                f"({tokens / max(seconds, 1e-9):.1f} tokens/s, the first batch includes compiling)")
    finally:
        if out is not None and out is not sys.stdout:
            out.close()
    if args.out:
        say(f"wrote {len(rows)} rows to {args.out}")
    return 0
