"""The report of `mmpo-jax inspect-data` (`mmpo_jax.commands.inspect_data`): the data
loaded and tokenized as a run loads it, rows read, kept and dropped by reason (with row
numbers), truncation, token-length distributions, the bucket histogram, one decoded
example with its loss mask (and in a packed layout one packed row), as a dict
(`inspect_data`, the `--json` output) and as text (`report_lines`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import datasets

from mmpo_jax.buckets import bucket_for, bucket_lengths
from mmpo_jax.data import batches, pipeline
from mmpo_jax.data.formats import DROP_REASONS, INVALID_REASONS, TOO_LONG
from mmpo_jax.data.layout import layout_of
from mmpo_jax.data.packing import row_segments
from mmpo_jax.data.reports import Drops, format_rows
from mmpo_jax.data.tokenizers import tokenizer_of

if TYPE_CHECKING:
    from mmpo_jax.config_schema import DataConfig, RunConfig
    from mmpo_jax.data.batches import PackSpec
    from mmpo_jax.data.pipeline import PreferenceData
    from mmpo_jax.data.tokenizer_protocol import Tokenizer

# The loss-masked (trained) tokens of the example are shown between these marks.
MARK_OPEN, MARK_CLOSE = "[[", "]]"


def inspect_data(run_cfg: RunConfig) -> dict[str, Any]:
    """The report of `mmpo-jax inspect-data` on `run_cfg`'s data: its tokenizer, then per
    split (train, test when set) the rows read, kept and dropped (`SplitReport.to_dict`),
    the batches (train; with `packed_row` in a packed layout) or the eval batches (test),
    and one example. Bad data raises the UserError a run would give."""
    cfg = run_cfg.data
    # a run packs each batch shard's pairs apart; here: one shard (the fill of one device)
    packing = batches.PackSpec.for_data(cfg, 1, run_cfg.optim.grad_accum)
    datasets.disable_progress_bars()
    tokenizer = tokenizer_of(cfg, run_cfg.model.path)
    result: dict[str, Any] = {"tokenizer": _tokenizer_info(cfg.tokenizer, tokenizer)}
    for which in ("train", "test"):
        data = pipeline.load_preference_data(cfg, which, tokenizer)
        if data is None:
            continue
        entry: dict[str, Any] = data.report.to_dict()
        if which == "train":
            plan = batches.batch_plan(data, cfg.batch_size, cfg.seed, packing)
            entry["batches"] = {**plan.to_dict(), "fill": plan.fill,
                                "micro_batches": run_cfg.optim.grad_accum}
            if packing is not None and plan.steps_per_epoch:
                entry["packed_row"] = _packed_row(data, cfg.batch_size, cfg.seed, packing)
        else:
            entry["eval_batches"] = -(-len(data) // cfg.batch_size)
        entry["example"] = _example(data, cfg.batch_size, cfg.seed, shuffled=which == "train")
        result[which] = entry
    return result


def _tokenizer_info(spec: str, tok: Tokenizer) -> dict[str, Any]:
    return {
        "spec": spec,
        "vocab_size": len(tok),
        "bos": tok.bos_token,
        "eos": tok.eos_token,
        "pad": tok.pad_token if tok.pad_token is not None else tok.eos_token,
        "chat_template": bool(tok.chat_template),
    }


def _example(data: PreferenceData, batch_size: int, seed: int, shuffled: bool) -> dict[str, Any]:
    """The first pair of global batch 0 as the train (or eval) step will see it."""
    if not shuffled:
        batch = batches.eval_batches(data, batch_size, process_index=0, process_count=1)[0]
        where = "pair 0 of eval batch 0"
    elif len(data) >= batch_size:
        batch = batches.train_batches(data, batch_size, seed, process_index=0, process_count=1)[0]
        where = "pair 0 of global batch 0"
    else:
        row = data.pair(0)
        length = bucket_for(
            len(row[0]) + max(len(row[1]), len(row[2])),
            bucket_lengths(data.max_length, batches.SMALLEST_BUCKET),
        )
        batch = batches.collate([row], [0], length, data.special.pad)
        where = "row 0 (fewer rows than data.batch_size)"
    index = int(batch.example_index[0])
    out: dict[str, Any] = {
        "where": where,
        "origin": data.origin(index),
        "padded_length": batch.input_ids.shape[-1],
    }
    for k, name in enumerate(("chosen", "rejected")):
        ids = batch.input_ids[0, k][batch.attention_mask[0, k] == 1].tolist()
        mask = batch.loss_mask[0, k][: len(ids)].tolist()
        out[name] = {
            "tokens": len(ids),
            "loss_tokens": int(sum(mask)),
            "text": _marked(data.tokenizer, ids, mask),
            "ids": ids,
            "loss_mask": mask,
        }
    return out


def _packed_row(data: PreferenceData, batch_size: int, seed: int, packing: PackSpec) -> dict[str, Any]:
    """The row (of `input_ids` `[rows, pack]`) of global batch 0 with the most pairs, the
    first of them, as the packed train step sees it: the batch comes from `train_batches`,
    and its segments are read back from that batch's arrays. Row 0 alone would show one
    long pair: first-fit places the longest pairs first."""
    batch = batches.train_batches(data, batch_size, seed, process_index=0, process_count=1,
                                  packing=packing)[0]
    rows, pack = batch.input_ids.shape
    by_row = [row_segments(batch, r, packing.micro) for r in range(rows)]
    row = max(range(rows), key=lambda r: (len({s.pair for s in by_row[r]}), -r))
    row_ids = batch.input_ids[row].tolist()
    segments = []
    for seg in by_row[row]:
        index = int(batch.example_index[seg.pair])
        start, end = seg.start, seg.start + seg.length
        # 0 on the prompt, 1 + k on answer k: `_marked` puts each answer in its own marks
        mask = [0] * seg.length
        for kind, at, n in seg.spans:
            mask[at - start : at - start + n] = [_SPAN_KINDS.index(kind)] * n
        segments.append({
            "segment": seg.segment,
            "pair": index,
            "origin": data.origin(index),
            "kind": "+".join(kind for kind, _, _ in seg.spans),
            "start": start,
            "length": seg.length,
            "spans": [{"kind": kind, "start": at, "length": n} for kind, at, n in seg.spans],
            "text": _marked(data.tokenizer, row_ids[start:end], mask, SHORT_TEXT),
        })
    return {
        "where": f"row {row} of global batch 0" + (
            f" (row {row // packing.micro} of micro-batch {row % packing.micro})" if packing.micro > 1 else ""),
        "row": row,
        "rows": rows,
        "pack_length": pack,
        "pairs": len({s["pair"] for s in segments}),
        "segments": segments,
        "padding": int((batch.segment_ids[row] == 0).sum()),
    }


_SPAN_KINDS = ("prompt", "chosen", "rejected")  # by their value in `_packed_row`'s mask
SHORT_TEXT = 64  # characters a packed row's text keeps of each prompt or answer


def _marked(tokenizer: Tokenizer, ids: list[int], mask: list[int], limit: int | None = None) -> str:
    """Decoded text with each run of loss-masked tokens (a run of one nonzero mask value)
    between MARK_OPEN and MARK_CLOSE; `limit`: each run's text cut to that many characters."""
    parts, start = [], 0
    for t in range(1, len(ids) + 1):
        if t == len(ids) or mask[t] != mask[start]:
            text = _shortened(tokenizer.decode(ids[start:t]), limit)
            parts.append(f"{MARK_OPEN}{text}{MARK_CLOSE}" if mask[start] else text)
            start = t
    return "".join(parts)


def _shortened(text: str, limit: int | None) -> str:
    """`text`, or its start and its end around "…": a prompt's question and a chat
    template's generation prompt both sit at its end."""
    if limit is None or len(text) <= limit:
        return text
    head = limit // 5
    return text[:head] + "…" + text[len(text) - (limit - head - 1):]


def report_lines(result: dict[str, Any], cfg: DataConfig) -> list[str]:
    """`inspect_data`'s report as the lines the command prints."""
    tok = result["tokenizer"]
    lines = [
        f"tokenizer {tok['spec']}: vocab {tok['vocab_size']}, bos {tok['bos']!r}, eos {tok['eos']!r}, "
        f"pad {tok['pad']!r}, chat template: {'yes' if tok['chat_template'] else 'no'}"
    ]
    for which in ("train", "test"):
        if which in result:
            lines += [""] + _split_text(which, result[which], cfg)
    if "test" not in result:
        lines += ["", "test data: none (data.test_files is not set)"]
    return lines


def _split_text(which: str, rep: dict[str, Any], cfg: DataConfig) -> list[str]:
    n_src = len(rep["sources"])
    lines = [
        f"== {which} data: {n_src} source{'s' if n_src > 1 else ''}, "
        f"{rep['rows_read']} rows read, {rep['kept']} kept, {rep['rows_read'] - rep['kept']} dropped =="
    ]
    for s in rep["sources"]:
        frac = f" (fraction {s['fraction']} of {s['rows_in_source']})" if s["fraction"] < 1 else ""
        dropped = sum(d["count"] for d in s["dropped"].values())
        lines.append(f"{s['name']} [{s['key']}]: {s['layout']}")
        lines.append(f"  rows read {s['rows_read']}{frac}, kept {s['kept']}, dropped {dropped}")
        invalid = sum(d["count"] for r, d in s["dropped"].items() if r in INVALID_REASONS)
        if s["rows_read"]:
            lines.append(
                f"  invalid {invalid} ({100 * invalid / s['rows_read']:.2f}%; "
                f"data.max_invalid_fraction={cfg.max_invalid_fraction})"
            )
        for reason, d in sorted(s["dropped"].items(), key=lambda x: -x[1]["count"]):
            rows = format_rows(s["label"], Drops(d["count"], d["rows"]))
            lines.append(f"    {reason:<31} {d['count']:>6}  {rows}")
            lines.append(f"    {'':<31} {'':>6}  ({DROP_REASONS[reason]})")
        if s["template_error"]:
            lines.append(f"    first chat template error: {s['template_error']}")
        for reason, detail in s["line_errors"].items():
            lines.append(f"    first {reason} line: {detail}")
    mpl = rep["max_prompt_length"]
    lines.append(
        f"truncation (max_length={rep['max_length']}, max_prompt_length={mpl}): "
        f"{rep['truncated']} kept rows truncated (prompt {rep['prompt_truncated']}, "
        f"completion {rep['completion_truncated']})"
    )
    cols = ("min", "p50", "p90", "p99", "max", "mean")
    lines.append(f"lengths in tokens{'':<17}" + "".join(f"{c:>8}" for c in cols))
    dropped_long = sum(s["dropped"].get(TOO_LONG, {}).get("count", 0) for s in rep["sources"])
    tables = [("before truncation", "lengths_before"), ("after truncation", "lengths")]
    if not rep["truncated"] and not dropped_long:
        tables = [("(nothing truncated)", "lengths")]
    for title, key in tables:
        lines.append(f"  {title}")
        for name, stats in rep[key].items():
            label = "sequence (prompt + longer)" if name == "sequence" else name
            lines.append(f"    {label:<30}" + "".join(f"{stats[c]:>8g}" for c in cols))
    if "batches" in rep:
        b = rep["batches"]
        lines.append(
            f"batches: batch_size {b['batch_size']} pairs, {b['steps_per_epoch']} steps per epoch, "
            f"{b['remainder']} rows left out of each epoch (the last incomplete batch)"
        )
        lines.append(f"buckets ({len(b['buckets'])}): " + " ".join(map(str, b["buckets"])))
        lines.append(f"  {'bucket':<28}" + "".join(f"{x:>7}" for x in b["buckets"]))
        lines.append(
            f"  {'rows (own length)':<28}"
            + "".join(f"{b['rows_per_bucket'][x]:>7}" for x in b["buckets"])
        )
        title = f"batches (epoch 0, seed {b['seed']})"
        lines.append(
            f"  {title:<28}" + "".join(f"{b['batches_per_bucket'][x]:>7}" for x in b["buckets"])
        )
        layout = "padded to each batch's bucket" if b["packing"] == "none" else (
            f"packed into rows of {_pack_length(cfg)} tokens (one batch shard"
            f"{'; each prompt once' if layout_of(b['packing']).shares_prompt else ''})")
        lines.append(
            f"tokens (epoch 0, data.packing={b['packing']}: {layout}): {b['real_tokens']} real "
            f"(prompt + chosen plus prompt + rejected), {b['computed_tokens']} computed, "
            f"fill {b['fill']:.2f}" + (" (above 1: real tokens count each prompt twice, the rows once)"
                                       if b["fill"] > 1 else "")
        )
        if b["steps_per_row_count"]:
            lines.append("  " + _rows_per_step(b["steps_per_row_count"], b["steps_per_epoch"],
                                               _pack_length(cfg), b["micro_batches"]))
    if "packed_row" in rep:
        lines += _packed_row_text(rep["packed_row"])
    if "eval_batches" in rep:
        padding = rep["eval_batches"] * cfg.batch_size - rep["kept"]
        lines.append(
            f"eval batches: {rep['eval_batches']} of {cfg.batch_size} pairs, in file order "
            f"(the last holds {padding} padding pairs)"
        )
    ex = rep["example"]
    lines.append(
        f"example: {ex['where']} ({ex['origin']}), padded to {ex['padded_length']} tokens;"
    )
    lines.append(f"  the loss covers the tokens between {MARK_OPEN} {MARK_CLOSE}")
    for name in ("chosen", "rejected"):
        e = ex[name]
        lines.append(f"  {name} ({e['tokens']} tokens, loss on {e['loss_tokens']}): {e['text']!r}")
    return lines


def _pack_length(cfg: DataConfig) -> int:
    """The settled `data.pack_length` of a packed layout (as `PackSpec.for_data` reads it)."""
    assert cfg.pack_length is not None, "DataConfig.settled() sets a packed layout's pack_length"
    return cfg.pack_length


def _rows_per_step(steps_per_rows: dict[Any, int], steps: int, pack: int, micro: int) -> str:
    """The packed rows a step computes, as a sentence: each row count is a shape the
    train step compiles once."""
    counts = {int(rows): k for rows, k in steps_per_rows.items()}  # JSON keys are strings

    def span(rows: Sequence[int]) -> str:
        return f"{min(rows)} rows" if min(rows) == max(rows) else f"{min(rows)} to {max(rows)} rows"

    each = f" ({micro} micro-batches of {span([r // micro for r in counts])})" if micro > 1 else ""
    if len(counts) == 1:
        return f"rows per step: {span(list(counts))} of {pack} tokens{each} in every step (one shape, one compile)"
    shapes = ", ".join(f"{rows} rows in {k}{f' of {steps} steps' if i == 0 else ''} ({100 * k / steps:.0f}%)"
                       for i, (rows, k) in enumerate(sorted(counts.items())))
    return (f"rows per step: {span(list(counts))} of {pack} tokens{each}, "
            f"{len(counts)} shapes (one compile each): {shapes}")


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _packed_row_text(row: dict[str, Any]) -> list[str]:
    segments, pack = row["segments"], row["pack_length"]
    used = sum(s["length"] for s in segments)
    lines = [
        f"packed row: {row['where']}, one of its {row['rows']} rows of {pack} tokens: "
        f"{_plural(row['pairs'], 'pair')} in {_plural(len(segments), 'segment')}, {used} tokens and "
        f"{row['padding']} padding;",
        f"  pair N: the data's N-th kept pair, from 0; the loss covers the tokens between {MARK_OPEN} {MARK_CLOSE}",
    ]
    seen: set[int] = set()
    for s in segments:
        spans = " + ".join(f"{sp['kind']} {sp['length']}" for sp in s["spans"])
        origin = "" if s["pair"] in seen else f" ({s['origin']})"
        seen.add(s["pair"])
        lines.append(f"  segment {s['segment']}, columns {s['start']}-{s['start'] + s['length'] - 1}: "
                     f"pair {s['pair']}{origin}, {spans} = {s['length']} tokens")
        lines.append(f"    {s['text']!r}")
    if row["padding"]:
        lines.append(f"  padding, columns {pack - row['padding']}-{pack - 1}: {row['padding']} tokens")
    return lines
