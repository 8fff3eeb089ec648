"""Build every shipped demo file in memory, deterministically from a seed.

`scripts/make_demo_data.py` writes what `build_demo_files` returns (or, with
`--check`, compares it with the package's files). The same seed gives the same
bytes on any machine with the same `tokenizers` BPE trainer.
"""

from __future__ import annotations

import hashlib
import json
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from mmpo_jax.data.builtin import (MANIFEST_FILE, PROBE_FILE, SPLITS, TOKENIZER_DIRS,
                                   demo_relpath)
from mmpo_jax.data.demo_tasks import (KINDS, SYSTEM_PROMPT, Task, conversational_row,
                                      draw_tasks, standard_row)
from mmpo_jax.data.probe_bank import make_probe
from mmpo_jax.data.tiny_tokenizer import VOCAB_SIZE, tokenizer_files, train_tiny_tokenizer
from mmpo_jax.data.tokenizer_protocol import Tokenizer

DEFAULT_SEED = 0
TRAIN_PER_KIND = 350
TEST_PER_KIND = 35


def _jsonl(rows: Iterable[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")


def tokenizer_corpus(tasks: Sequence[Task]) -> list[str]:
    """The text the tokenizer learns from: train prompts and answers, as both forms show
    them (answers alone in a chat turn, and after a space in the standard form)."""
    texts = []
    for task in tasks:
        texts += [SYSTEM_PROMPT, task.prompt, task.chosen, task.rejected,
                  " " + task.chosen, " " + task.rejected]
    return texts


def build_demo_files(seed: int = DEFAULT_SEED, train_per_kind: int = TRAIN_PER_KIND,
                     test_per_kind: int = TEST_PER_KIND,
                     vocab_size: int = VOCAB_SIZE) -> dict[str, bytes]:
    """Relative path under `mmpo_jax/data/demo/` -> file content."""
    splits = draw_tasks(seed, train_per_kind, test_per_kind)
    files: dict[str, bytes] = {}
    for split in SPLITS:
        ids = [f"{split}-{i:05d}" for i in range(len(splits[split]))]
        pairs = list(zip(splits[split], ids))
        files[demo_relpath(split, "standard")] = _jsonl(standard_row(t, i) for t, i in pairs)
        files[demo_relpath(split, "conversational")] = _jsonl(
            conversational_row(t, i) for t, i in pairs)
    probe = make_probe(seed)
    files[PROBE_FILE] = _jsonl(item.to_json() for item in probe)
    tokenizer = train_tiny_tokenizer(tokenizer_corpus(splits["train"]), vocab_size)
    for name, text in tokenizer_files(tokenizer).items():
        files[f"{TOKENIZER_DIRS['tiny']}/{name}"] = text.encode("utf-8")
    manifest = {
        "generator": "scripts/make_demo_data.py",
        "seed": seed,
        "rows": {split: {kind: sum(t.kind == kind for t in splits[split]) for kind in KINDS}
                 for split in SPLITS},
        "probe_items": dict(sorted(Counter(item.category for item in probe).items())),
        "tokenizer": {"builtin": "tiny", "vocab_size": tokenizer.get_vocab_size()},
        "sha256": {path: hashlib.sha256(data).hexdigest() for path, data in sorted(files.items())},
    }
    files[MANIFEST_FILE] = (json.dumps(manifest, indent=2) + "\n").encode("utf-8")
    return files


def conversation_lengths(rows: Sequence[dict[str, Any]], tokenizer: Tokenizer) -> list[int]:
    """Tokens of each conversational row through the chat template: the prompt with
    the longer of its two completions (what a training batch must hold)."""
    lengths = []
    for row in rows:
        longest = max(
            len(tokenizer.apply_chat_template(row["prompt"] + row[side], tokenize=True)["input_ids"])
            for side in ("chosen", "rejected"))
        lengths.append(longest)
    return lengths


def length_summary(lengths: Sequence[int], limit: int = 64) -> dict[str, float]:
    ordered = sorted(lengths)
    return {"rows": len(ordered), "min": ordered[0], "median": statistics.median(ordered),
            "mean": round(statistics.fmean(ordered), 1),
            "p90": ordered[int(0.9 * (len(ordered) - 1))],
            "max": ordered[-1], f"under_{limit}": round(sum(n < limit for n in ordered)
                                                       / len(ordered), 4)}
