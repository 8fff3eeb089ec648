"""`mmpo-jax inspect-data`: the report on the demo data, and on a file with bad rows of every kind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmpo_jax import cli

BROKEN = Path(__file__).parent / "data" / "broken.jsonl"
# What each line of tests/data/broken.jsonl breaks (lines 1-20 are good rows).
BROKEN_LINES = {
    "missing_field": [21, 28],  # no rejected; chosen null
    "wrong_type": [22, 23],  # content 4 (a number); chosen a string, not messages
    "empty_completion": [24],
    "chosen_equals_rejected": [25],
    "chat_template_error": [26],  # role "tool": builtin:tiny's template raises
    "no_completion_after_truncation": [27],  # a 1200-token prompt, max_prompt_length null
}
BROKEN_ARGS = ["data.max_prompt_length=null", "data.max_length=256", "data.batch_size=4"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    # one tokenized cache for the session's data tests (it is keyed by content)
    return str(tmp_path_factory.getbasetemp() / "mmpo_data_cache")


def run(capsys, *argv):
    code = cli.main(["inspect-data", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_demo_data_report(tmp_path, capsys, cache_dir):
    from mmpo_jax.data.builtin import demo_data_path
    from mmpo_jax.data.tokenizers import load_tokenizer

    config = tmp_path / "data_only.yaml"  # a config with only a data section
    config.write_text(
        f"data:\n  train_files: builtin:demo\n  test_files: builtin:demo\n  cache_dir: {cache_dir}\n"
    )
    code, out, _ = run(capsys, str(config), "--json")
    assert code == 0
    rep = json.loads(out)
    lines = sum(1 for line in demo_data_path("train").read_text().splitlines() if line.strip())
    train = rep["train"]
    assert train["rows_read"] == lines and train["kept"] == lines  # the demo has no bad rows
    assert rep["test"]["rows_read"] == sum(
        1 for line in demo_data_path("test").read_text().splitlines() if line.strip()
    )
    b = train["batches"]
    assert b["steps_per_epoch"] == lines // 8 and b["remainder"] == lines % 8
    assert sum(b["batches_per_bucket"].values()) == b["steps_per_epoch"]
    assert sum(b["rows_per_bucket"].values()) == lines
    assert b["buckets"] == [16, 32, 64, 128, 256, 512, 1024]
    assert train["lengths"]["sequence"]["p50"] < 64  # the demo is short, as promised

    # the example: loss only on the completion, which ends with EOS
    tok = load_tokenizer("builtin:tiny")
    ex = train["example"]["chosen"]
    first_loss = ex["loss_mask"].index(1)
    assert ex["loss_mask"] == [0] * first_loss + [1] * (ex["tokens"] - first_loss)
    assert ex["ids"][-1] == tok.eos_token_id
    assert (
        ex["text"]
        == tok.decode(ex["ids"][:first_loss]) + "[[" + tok.decode(ex["ids"][first_loss:]) + "]]"
    )
    assert tok.decode(ex["ids"][:first_loss]).endswith("<|assistant|>\n")

    code, out, _ = run(capsys, str(config))
    assert code == 0
    assert f"== train data: 1 source, {lines} rows read, {lines} kept, 0 dropped ==" in out
    assert (
        "buckets (7): 16 32 64 128 256 512 1024" in out
        and "example: pair 0 of global batch 0" in out
    )


def test_broken_file_lists_every_reason(capsys, cache_dir):
    code, out, err = run(
        capsys,
        f"data.train_files={BROKEN}",
        "data.max_invalid_fraction=0.3",
        f"data.cache_dir={cache_dir}",
        *BROKEN_ARGS,
        "--json",
    )
    assert code == 0, err
    (src,) = json.loads(out)["train"]["sources"]
    assert {k: d["rows"] for k, d in src["dropped"].items()} == BROKEN_LINES
    assert src["kept"] == 20 and src["rows_read"] == 28 and src["label"] == "line"

    code, out, err = run(
        capsys,
        f"data.train_files={BROKEN}",
        "data.max_invalid_fraction=0.3",
        f"data.cache_dir={cache_dir}",
        *BROKEN_ARGS,
    )
    assert code == 0
    for reason, lines in BROKEN_LINES.items():
        shown = ("lines " if len(lines) > 1 else "line ") + ", ".join(map(str, lines))
        assert any(reason in line and line.rstrip().endswith(shown) for line in out.splitlines()), (
            reason
        )


def test_broken_file_past_the_fraction_fails_short(capsys, cache_dir):
    code, out, err = run(
        capsys, f"data.train_files={BROKEN}", f"data.cache_dir={cache_dir}", *BROKEN_ARGS
    )
    assert code == 2 and out == ""
    assert "Traceback" not in err and len(err.splitlines()) < 12
    assert "7 of 28 rows are invalid" in err and "data.max_invalid_fraction=0.01" in err
    for reason, lines in BROKEN_LINES.items():
        if reason != "no_completion_after_truncation":
            assert reason in err and ", ".join(map(str, lines)) in err


def test_malformed_line_is_a_bad_row(tmp_path, capsys, cache_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(BROKEN.read_text().splitlines()[0] + "\n{'single': 'quotes'}\n")
    code, out, err = run(capsys, f"data.train_files={bad}", f"data.cache_dir={cache_dir}")
    assert code == 2 and "Traceback" not in err
    assert "1 of 2 rows are invalid" in err and "invalid_json: 1 (line 2)" in err
    assert "first error: line 2, column 2: not valid JSON" in err
    # allowed: the report counts it, with the line and what is wrong with it
    code, out, err = run(
        capsys, str(bad), "data.max_invalid_fraction=0.5", f"data.cache_dir={cache_dir}"
    )
    assert code == 0, err
    assert "invalid_json" in out and "first invalid_json line: line 2, column 2" in out
    assert "1 source, 2 rows read, 1 kept, 1 dropped" in out


def test_a_data_source_instead_of_a_config(tmp_path, capsys, cache_dir):
    from mmpo_jax.data.builtin import demo_data_path

    demo = sum(1 for line in demo_data_path("train").read_text().splitlines() if line.strip())
    assert demo == 3150
    code, out, err = run(capsys, "builtin:demo", f"data.cache_dir={cache_dir}", "--json")
    assert code == 0, err
    rep = json.loads(out)
    assert rep["train"]["rows_read"] == rep["train"]["kept"] == 3150 and "test" not in rep
    assert rep["train"]["sources"][0]["key"] == "data.train_files"
    assert rep["tokenizer"]["spec"] == "builtin:tiny"  # the rest of the config: defaults
    # a .jsonl path (with YAML's ': ' in its name), overrides after it
    path = tmp_path / "my: prefs.jsonl"
    path.write_text("".join(line + "\n" for line in BROKEN.read_text().splitlines()[:20]))
    code, out, err = run(
        capsys, str(path), "data.batch_size=4", f"data.cache_dir={cache_dir}", "--json"
    )
    assert code == 0, err
    rep = json.loads(out)
    assert rep["train"]["sources"][0]["name"] == str(path)
    assert rep["train"]["kept"] == 20 and rep["train"]["batches"]["batch_size"] == 4
    # a .yaml item is still a config file
    code, out, err = run(capsys, str(tmp_path / "missing.yaml"))
    assert code == 2 and "config file not found" in err


def test_help_describes_the_command(capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(["inspect-data", "--help"])
    assert exit.value.code == 0
    out = capsys.readouterr().out
    assert "builtin:demo" in out and "data.train_files=SOURCE" in out
    assert "Loads and tokenizes the train (and test) data" in out


# configs/tiny.yaml packed: rows of 2 x data.max_length = 128 tokens; no test split, for speed
TINY = ["configs/tiny.yaml", "data.test_files=null"]
LAYOUTS = ("packed", "shared_prompt")


@pytest.fixture(scope="module")
def tiny_reports(cache_dir):
    """{layout: (--json report, text report)} of configs/tiny.yaml, and its train data."""
    import contextlib
    import io

    from mmpo_jax.config import load_config
    from mmpo_jax.data.pipeline import load_preference_data

    reports = {}
    for layout in LAYOUTS:
        outs = []
        for extra in (["--json"], []):
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                argv = [*TINY, f"data.packing={layout}", f"data.cache_dir={cache_dir}", *extra]
                assert cli.main(["inspect-data", *argv]) == 0
            outs.append(buf.getvalue())
        reports[layout] = (json.loads(outs[0]), outs[1])
    cfg = load_config(TINY[0], [*TINY[1:], f"data.cache_dir={cache_dir}"])
    return reports, load_preference_data(cfg.data, "train")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_packed_row_is_a_row_of_the_first_batch(tiny_reports, layout):
    """The shown row's segments hold each pair's tokenized prompt, chosen and rejected
    ids (from the unpacked data), at the columns and segment ids of global batch 0's row,
    and the row is one with the most pairs."""
    from mmpo_jax.data.batches import PackSpec, train_batches
    from mmpo_jax.data.layout import layout_of

    reports, data = tiny_reports
    row = reports[layout][0]["train"]["packed_row"]
    spec = PackSpec(pack_length=128, shards=1, micro=1, width=64, layout=layout_of(layout))
    batch = train_batches(data, 8, 0, process_index=0, process_count=1, packing=spec)[0]
    ids, segment_ids = batch.input_ids[row["row"]], batch.segment_ids[row["row"]]
    answers = [["chosen", "rejected"]] if spec.layout.shares_prompt else [["chosen"], ["rejected"]]
    expected_kinds = ["+".join(["prompt", *a]) for a in answers]
    kinds: dict[int, list[str]] = {}
    column = 0
    for seg in row["segments"]:
        pair = data.pair(seg["pair"])
        assert seg["pair"] in batch.example_index and seg["origin"] == data.origin(seg["pair"])
        kinds.setdefault(seg["pair"], []).append(seg["kind"])
        spans = seg["spans"]
        assert [s["kind"] for s in spans] == seg["kind"].split("+")
        lengths = dict(zip(("prompt", "chosen", "rejected"), (int(n) for n in data.lengths[seg["pair"]])))
        assert [s["length"] for s in spans] == [lengths[s["kind"]] for s in spans]
        assert seg["start"] == spans[0]["start"] == column  # packed back to back
        for s in spans:
            tokens = dict(zip(("prompt", "chosen", "rejected"), pair))[s["kind"]]
            assert ids[s["start"] : s["start"] + s["length"]].tolist() == tokens
            assert s["start"] == column
            column += s["length"]
        assert seg["length"] == column - seg["start"]
        assert set(segment_ids[seg["start"] : column].tolist()) == {seg["segment"]}
        for s in spans[1:]:  # an answer short enough to show whole sits in the loss marks
            answer = data.tokenizer.decode(dict(zip(("chosen", "rejected"), pair[1:]))[s["kind"]])
            if len(answer) <= 64:
                assert f"[[{answer}]]" in seg["text"]
    assert all(k == expected_kinds for k in kinds.values()) and row["pairs"] == len(kinds) > 1
    assert row["padding"] == 128 - column and not segment_ids[column:].any()
    per_seq = 1 if spec.layout.shares_prompt else 2
    most = max(len(set(r[r > 0].tolist())) // per_seq for r in batch.segment_ids)
    assert row["pairs"] == most and row["rows"] == batch.input_ids.shape[0]


def test_packed_row_and_rows_per_step_read_as_words(tiny_reports):
    reports, _ = tiny_reports
    for layout in LAYOUTS:
        rep, out = reports[layout]
        b = rep["train"]["batches"]
        counts = sorted((int(k), v) for k, v in b["steps_per_row_count"].items())
        assert len(counts) > 1
        steps = b["steps_per_epoch"]
        shapes = [f"{n} rows in {k} ({round(100 * k / steps)}%)" for n, k in counts]
        shapes[0] = shapes[0].replace(" (", f" of {steps} steps (")
        expected = (f"  rows per step: {counts[0][0]} to {counts[-1][0]} rows of 128 tokens, "
                    f"{len(counts)} shapes (one compile each): " + ", ".join(shapes))
        assert expected in out.splitlines(), layout
        row = rep["train"]["packed_row"]
        segments = row["segments"]
        assert (f"packed row: row {row['row']} of global batch 0, one of its {row['rows']} rows of 128 "
                f"tokens: {row['pairs']} pairs in {len(segments)} segments") in out
        for s in segments:
            spans = " + ".join(f"{x['kind']} {x['length']}" for x in s["spans"])
            line = (f"  segment {s['segment']}, columns {s['start']}-{s['start'] + s['length'] - 1}: "
                    f"pair {s['pair']}")
            assert any(x.startswith(line) and x.endswith(f"{spans} = {s['length']} tokens")
                       for x in out.splitlines()), line
            assert f"    {s['text']!r}" in out.splitlines()
        if row["padding"]:
            assert f"  padding, columns {128 - row['padding']}-127: {row['padding']} tokens" in out
