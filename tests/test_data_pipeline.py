"""The data pipeline: sources, bad rows, the tokenization cache, and deterministic sharded batches."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from mmpo_jax.buckets import bucket_lengths
from mmpo_jax.config_schema import DataConfig
from mmpo_jax.data import batches, formats, tokenized
from mmpo_jax.data.batches import SMALLEST_BUCKET, collate, eval_batches, train_batches
from mmpo_jax.data.pipeline import load_preference_data
from mmpo_jax.errors import UserError

FIELDS = ("input_ids", "attention_mask", "loss_mask", "pair_mask", "example_index")


@pytest.fixture(scope="module")
def tiny():
    from mmpo_jax.data.tokenizers import load_tokenizer

    return load_tokenizer("builtin:tiny")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    # one tokenized cache for the session's data tests (it is keyed by content)
    return str(tmp_path_factory.getbasetemp() / "mmpo_data_cache")


@pytest.fixture(scope="module")
def demo(tiny, cache_dir):
    cfg = DataConfig(train_files="builtin:demo", cache_dir=cache_dir)
    return load_preference_data(cfg, "train", tiny)


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def std_rows(n, start=0):
    return [
        {"prompt": f"What is {i} + {i}?", "chosen": f" {2 * i}", "rejected": f" {2 * i + 1}"}
        for i in range(start, start + n)
    ]


def load(path, tok, cache_dir, **kw):
    return load_preference_data(
        DataConfig(train_files=path, cache_dir=cache_dir, **kw), "train", tok
    )


def assert_same_batch(a, b):
    for name in FIELDS:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


# --------------------------------------------------------------------------- #
# Batches
# --------------------------------------------------------------------------- #
def test_collate_layout_by_hand():
    # pair 0: prompt [1, 2], chosen [3, 4, 9], rejected [5, 9]; pair 1: no prompt
    batch = collate(
        [([1, 2], [3, 4, 9], [5, 9]), ([], [7, 9], [8, 8, 9])],
        [4, 0],
        seq_len=6,
        pad_id=0,
        num_pairs=3,
    )
    np.testing.assert_array_equal(
        batch.input_ids,
        [
            [[1, 2, 3, 4, 9, 0], [1, 2, 5, 9, 0, 0]],
            [[7, 9, 0, 0, 0, 0], [8, 8, 9, 0, 0, 0]],
            [[0] * 6, [0] * 6],
        ],
    )
    np.testing.assert_array_equal(
        batch.attention_mask,
        [
            [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]],
            [[1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]],
            [[0] * 6] * 2,
        ],
    )
    # completion tokens only, and never position 0 (nothing predicts it)
    np.testing.assert_array_equal(
        batch.loss_mask,
        [
            [[0, 0, 1, 1, 1, 0], [0, 0, 1, 1, 0, 0]],
            [[0, 1, 0, 0, 0, 0], [0, 1, 1, 0, 0, 0]],
            [[0] * 6] * 2,
        ],
    )
    assert batch.pair_mask.tolist() == [1, 1, 0] and batch.example_index.tolist() == [4, 0, -1]
    assert batch.input_ids.dtype == np.int32 and batch.loss_mask.dtype == np.int32


def test_two_processes_split_every_global_batch(demo):
    n, B = len(demo), 12
    one = train_batches(demo, B, seed=3, process_index=0, process_count=1)
    halves = [train_batches(demo, B, seed=3, process_index=p, process_count=2) for p in (0, 1)]
    per_epoch, remainder = n // B, n % B
    assert remainder == batches.batch_plan(demo, B, 3).remainder > 0
    seen: list[int] = []
    for step in range(per_epoch):
        whole = one[step]
        parts = [h[step] for h in halves]
        assert (
            parts[0].input_ids.shape
            == parts[1].input_ids.shape
            == (B // 2, 2, whole.input_ids.shape[-1])
        )
        for name in FIELDS:
            np.testing.assert_array_equal(
                np.concatenate([getattr(p, name) for p in parts]),
                getattr(whole, name),
                err_msg=name,
            )
        seen += parts[0].example_index.tolist() + parts[1].example_index.tolist()
    # disjoint slices, whose union is the epoch's rows less the remainder
    assert len(seen) == len(set(seen)) == n - remainder
    assert set(seen) <= set(range(n))
    # the next epoch: the same rows, reshuffled
    order = batches.epoch_order(n, 3)
    epoch1 = np.concatenate(
        [batches.global_batch_rows(order, n, B, s) for s in range(per_epoch, 2 * per_epoch)]
    )
    assert len(set(epoch1.tolist())) == n - remainder and epoch1.tolist() != seen
    assert one[per_epoch].example_index.tolist() == epoch1[:B].tolist()
    # every pair holds the row it names
    batch = halves[1][5]
    for p, index in enumerate(batch.example_index):
        prompt, chosen, rejected = demo.pair(int(index))
        t = len(prompt) + len(chosen)
        assert batch.input_ids[p, 0, :t].tolist() == prompt + chosen
        assert batch.loss_mask[p, 0].sum() == len(chosen)


def test_restart_sees_the_same_batches(tiny, cache_dir, demo):
    B, seed = 16, 7
    first = train_batches(demo, B, seed, 0, 1)
    per_epoch = len(demo) // B
    steps = [0, 1, per_epoch - 1, per_epoch, per_epoch + 3]
    expected = {s: first[s] for s in steps}
    # a new process: data loaded again (from the cache), pipeline built again
    again = load_preference_data(
        DataConfig(train_files="builtin:demo", cache_dir=cache_dir), "train", tiny
    )
    resumed = train_batches(again, B, seed, 0, 1)
    for s in steps:
        assert_same_batch(resumed[s], expected[s])
    # iterating from a step gives the same stream
    it = iter(resumed.slice(slice(per_epoch - 1, None)).to_iter_dataset())
    assert_same_batch(next(it), expected[per_epoch - 1])
    assert_same_batch(next(it), expected[per_epoch])
    # and the seed matters
    other = train_batches(demo, B, seed + 1, 0, 1)[0]
    assert other.example_index.tolist() != expected[0].example_index.tolist()


@pytest.mark.parametrize("max_length", [1024, 48])
def test_batch_shapes_are_buckets(tiny, cache_dir, max_length):
    data = load_preference_data(
        DataConfig(
            train_files="builtin:demo",
            cache_dir=cache_dir,
            max_length=max_length,
            max_prompt_length=32 if max_length < 64 else 512,
        ),
        "train",
        tiny,
    )
    B = 32
    batches = train_batches(data, B, seed=0, process_index=0, process_count=1)
    buckets = bucket_lengths(max_length, SMALLEST_BUCKET)
    shapes = set()
    for step in range(len(data) // B):
        batch = batches[step]
        shapes.add(batch.input_ids.shape)
        longest = int(batch.attention_mask.sum(-1).max())
        # independently: the smallest power of two >= 16 holding the longest row, at most max_length
        want = min(max(16, 2 ** math.ceil(math.log2(longest))), max_length)
        assert batch.input_ids.shape == (B, 2, want)
    assert len(shapes) <= len(buckets)
    assert buckets == ((16, 32, 64, 128, 256, 512, 1024) if max_length == 1024 else (16, 32, 48))
    if max_length == 48:
        assert data.report.truncated > 0


def test_eval_batches_cover_every_row_once(tmp_path, tiny, cache_dir):
    data = load(write_jsonl(tmp_path / "t.jsonl", std_rows(11)), tiny, cache_dir)
    whole = eval_batches(data, 4, 0, 1)
    assert len(whole) == 3
    assert [whole[b].example_index.tolist() for b in range(3)] == [
        [0, 1, 2, 3],
        [4, 5, 6, 7],
        [8, 9, 10, -1],
    ]
    assert whole[2].pair_mask.tolist() == [1, 1, 1, 0]
    assert whole[2].loss_mask[3].sum() == 0
    halves = [eval_batches(data, 4, p, 2) for p in (0, 1)]
    for b in range(3):
        for name in FIELDS:
            np.testing.assert_array_equal(
                np.concatenate([getattr(h[b], name) for h in halves]), getattr(whole[b], name)
            )


def test_batch_size_must_fit(tmp_path, tiny, cache_dir):
    data = load(write_jsonl(tmp_path / "t.jsonl", std_rows(5)), tiny, cache_dir)
    with pytest.raises(UserError, match="data.batch_size=8 is larger than the 5"):
        train_batches(data, 8, 0, 0, 1)
    with pytest.raises(UserError, match="multiple of the 2 processes"):
        train_batches(data, 3, 0, 0, 2)


# --------------------------------------------------------------------------- #
# Sources and the cache
# --------------------------------------------------------------------------- #
def _count_tokenized_rows(monkeypatch) -> list[int]:
    """The rows of each call to the tokenizer from now on (an empty list: nothing tokenized)."""
    calls: list[int] = []
    original = formats.tokenize_records

    def counting(batch, **kw):
        calls.append(len(batch["prompt"]))
        return original(batch, **kw)

    monkeypatch.setattr(formats, "tokenize_records", counting)
    return calls


def test_second_load_does_not_tokenize(tmp_path, tiny, monkeypatch):
    calls = _count_tokenized_rows(monkeypatch)
    path = write_jsonl(tmp_path / "t.jsonl", std_rows(20))
    cache = str(tmp_path / "cache")
    first = load(path, tiny, cache)
    assert sum(calls) == 20
    calls.clear()
    from mmpo_jax.data.tokenizers import load_tokenizer

    again = load(
        path, load_tokenizer("builtin:tiny"), cache
    )  # a new tokenizer object, same content
    assert calls == []
    assert [again.pair(i) for i in range(20)] == [first.pair(i) for i in range(20)]
    # other truncation limits reuse the cached ids
    short = load(path, tiny, cache, max_length=8, max_prompt_length=4)
    assert calls == [] and short.report.truncated > 0
    assert all(len(short.pair(i)[0]) + len(short.pair(i)[1]) <= 8 for i in range(len(short)))
    # another tokenizer (or other rows) tokenizes again
    from test_data_formats import make_tokenizer

    load(path, make_tokenizer(), cache)
    assert sum(calls) == 20


def test_mixture_keeps_the_first_fraction(tmp_path, tiny, cache_dir):
    a = write_jsonl(tmp_path / "a.jsonl", std_rows(10))
    b = write_jsonl(tmp_path / "b.jsonl", std_rows(4, start=100))
    cfg = DataConfig(mixture={a: 0.55, b: 1.0}, cache_dir=cache_dir)
    data = load_preference_data(cfg, "train", tiny)
    ra, rb = data.report.sources
    assert (ra.rows_in_source, ra.rows_read, ra.kept, ra.key) == (10, 5, 5, "data.mixture")
    assert (rb.rows_in_source, rb.rows_read, rb.kept) == (4, 4, 4)
    assert [data.origin(i) for i in (0, 4, 5, 8)] == [
        f"{a} line 1",
        f"{a} line 5",
        f"{b} line 1",
        f"{b} line 4",
    ]
    direct = load(
        write_jsonl(tmp_path / "c.jsonl", std_rows(5) + std_rows(4, start=100)), tiny, cache_dir
    )
    assert [data.pair(i) for i in range(9)] == [direct.pair(i) for i in range(9)]


def test_parquet_and_json_array_read_like_jsonl(tmp_path, tiny, cache_dir):
    import datasets

    rows = std_rows(6)
    jsonl = load(write_jsonl(tmp_path / "t.jsonl", rows), tiny, cache_dir)
    (tmp_path / "t.json").write_text(json.dumps(rows, indent=1))
    (tmp_path / "field.json").write_text(json.dumps({"data": rows}))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "t.parquet"))
    for name in ("t.json", "field.json", "t.parquet"):
        other = load(str(tmp_path / name), tiny, cache_dir)
        assert [other.pair(i) for i in range(6)] == [jsonl.pair(i) for i in range(6)]
        assert other.report.sources[0].label == "row"
    # a byte order mark and Windows line ends; a .json file of JSON lines
    crlf = "\ufeff" + "".join(json.dumps(r) + "\r\n" for r in rows)
    for name in ("bom.jsonl", "lines.json"):
        (tmp_path / name).write_text(crlf if name == "bom.jsonl" else crlf[1:], encoding="utf-8")
        other = load(str(tmp_path / name), tiny, cache_dir)
        assert [other.pair(i) for i in range(6)] == [jsonl.pair(i) for i in range(6)]
        assert other.report.sources[0].label == "line"


def test_bad_rows_are_counted_with_their_lines(tmp_path, tiny, cache_dir):
    good = std_rows(14)
    bad = [
        {"prompt": "q", "chosen": "a"},  # line 15
        {"prompt": "q", "chosen": 7, "rejected": "b"},  # 16
        {"prompt": "q", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"},  # 17
        {"prompt": "q", "chosen": "", "rejected": "b"},  # 18
        {"prompt": "q", "chosen": " same", "rejected": " same"},  # 19
        "",  # 20: a blank line is not a row
        {"prompt": "q", "chosen": None, "rejected": "b"},  # 21
        {
            "prompt": "long " * 300,
            "chosen": " a",
            "rejected": " b",
        },  # 22: too long without max_prompt_length
    ]
    path = write_jsonl(tmp_path / "bad.jsonl", good + bad)
    data = load(
        path, tiny, cache_dir, max_invalid_fraction=0.5, max_length=64, max_prompt_length=None
    )
    src = data.report.sources[0]
    dropped = {k: (d.count, d.rows) for k, d in src.dropped.items()}
    assert dropped == {
        "missing_field": (2, [15, 21]),
        "wrong_type": (2, [16, 17]),
        "empty_completion": (1, [18]),
        "chosen_equals_rejected": (1, [19]),
        formats.TOO_LONG: (1, [22]),
    }
    assert (src.rows_read, src.kept, src.invalid, src.label) == (21, 14, 6, "line")
    # past the allowed fraction: a short error naming the worst reasons and their lines
    with pytest.raises(UserError) as err:
        load(path, tiny, cache_dir, max_length=64, max_prompt_length=None)
    msg = str(err.value)
    assert "6 of 21 rows are invalid" in msg and "data.max_invalid_fraction=0.01" in msg
    assert "missing_field: 2 (lines 15, 21)" in msg and "wrong_type: 2 (lines 16, 17)" in msg
    assert "empty_completion: 1 (line 18)" in msg and "chosen_equals_rejected: 1 (line 19)" in msg
    assert msg.index("missing_field") < msg.index("empty_completion")  # worst first
    assert formats.TOO_LONG not in msg  # a length limit, not bad data


def test_chat_template_errors_are_bad_rows(tmp_path, tiny, cache_dir):
    msgs = lambda role, text: [{"role": role, "content": text}]  # noqa: E731
    rows = [
        {
            "prompt": msgs("user", f"q{i}"),
            "chosen": msgs("assistant", "a"),
            "rejected": msgs("assistant", "b"),
        }
        for i in range(9)
    ] + [
        {
            "prompt": msgs("tool", "q"),
            "chosen": msgs("assistant", "a"),
            "rejected": msgs("assistant", "b"),
        }
    ]
    path = write_jsonl(tmp_path / "conv.jsonl", rows)
    data = load(path, tiny, cache_dir, max_invalid_fraction=0.2)
    src = data.report.sources[0]
    assert src.dropped["chat_template_error"].rows == [10] and src.kept == 9
    assert "roles are system, user and assistant" in src.template_error
    with pytest.raises(UserError, match=r"chat_template_error: 1 \(line 10\)"):
        load(path, tiny, cache_dir)


def test_start_errors_name_the_file_and_line(tmp_path, tiny, cache_dir, monkeypatch):
    # a malformed line is a bad row (tests/test_data_quickstart.py): half the file is too
    # many, and the error names the line, the column and what is wrong
    bad_json = tmp_path / "broken.jsonl"
    bad_json.write_text(json.dumps(std_rows(1)[0]) + "\n\n" + '{"prompt": "q", "chosen": "a",\n')
    with pytest.raises(
        UserError,
        match=r"data.train_files: '.*broken.jsonl': 1 of 2 rows are invalid(.|\n)*"
        r"invalid_json: 1 \(line 3\)(.|\n)*first error: line 3, column \d+: not valid JSON",
    ):
        load(str(bad_json), tiny, cache_dir)
    not_object = write_jsonl(tmp_path / "list.jsonl", std_rows(1) + ["[1, 2]"])
    with pytest.raises(
        UserError,
        match=r"not_an_object: 1 \(line 2\)(.|\n)*first error: line 2: expected a JSON object",
    ):
        load(not_object, tiny, cache_dir)
    array = tmp_path / "a.json"
    array.write_text('[\n{"prompt": "q", "chosen": "a", "rejected": "b"},\n{"prompt": }\n]')
    with pytest.raises(UserError, match=r"a.json' is not valid JSON at line 3, column 12"):
        load(str(array), tiny, cache_dir)
    with pytest.raises(UserError, match=r"data.train_files: no such file '.*missing.jsonl'"):
        load(str(tmp_path / "missing.jsonl"), tiny, cache_dir)
    typo = write_jsonl(tmp_path / "typo.jsonl", [{"promt": "q", "chosen": "a", "rejected": "b"}])
    with pytest.raises(
        UserError, match=r"typo.jsonl': unknown column 'promt': did you mean 'prompt'"
    ):
        load(typo, tiny, cache_dir)
    (tmp_path / "data.csv").write_text("prompt,chosen,rejected\n")
    with pytest.raises(UserError, match="is not a .json, .jsonl or .parquet file"):
        load(str(tmp_path / "data.csv"), tiny, cache_dir)
    with pytest.raises(UserError, match="data.train_files is not set"):
        load_preference_data(DataConfig(), "train", tiny)
    # a hub id, offline: fails at once, saying what to check
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(
        UserError,
        match=r"data.test_files: no such local file 'nobody/no-such-dataset'.*"
        r"split 'test_prefs'.*HF_DATASETS_OFFLINE",
    ):
        load_preference_data(
            DataConfig(
                train_files="x",
                test_files="nobody/no-such-dataset",
                test_split="test_prefs",
                cache_dir=cache_dir,
            ),
            "test",
            tiny,
        )


def _ids(data):
    return [tuple(map(list, data.pair(i))) for i in range(len(data))]


def _load_heard(path, tok, cache, heard):
    return load_preference_data(DataConfig(train_files=path, cache_dir=cache), "train", tok, log=heard.append)


@pytest.mark.parametrize("damage", ["flip", "no checksum", "bad checksum file"])
def test_a_cache_that_changed_since_it_was_written_is_tokenized_again(tmp_path, tiny, monkeypatch, damage):
    """Bit rot in the tokenized cache used to be read as token ids (a readable file, other
    text): its checksum is checked on reuse, a mismatch (or no checksum) is one line in the
    run's log, and the rows tokenize again, to the ids of a fresh tokenization."""
    calls = _count_tokenized_rows(monkeypatch)
    path = write_jsonl(tmp_path / "t.jsonl", std_rows(30))
    cache = tmp_path / "cache"
    fresh = _ids(load(path, tiny, str(cache)))
    (entry,) = (cache / "mmpo_jax_tokenized").glob("*.arrow")
    (checksum,) = (cache / "mmpo_jax_tokenized").glob("*.sha256.json")
    written = entry.read_bytes()
    heard: list[str] = []
    calls.clear()
    assert _ids(_load_heard(path, tiny, str(cache), heard)) == fresh
    assert calls == [] and not [h for h in heard if "deleted" in h], heard  # negative control: reused
    if damage == "flip":
        # one bit of a token id of row 7's prompt: the file still reads as Arrow, with other ids
        at = written.index(np.asarray(fresh[7][0], dtype=np.int32).tobytes())
        body = bytearray(written)
        body[at] ^= 0x01
        entry.write_bytes(bytes(body))
        monkeypatch.setattr(tokenized, "_checksum_mismatch", lambda _: None)
        assert _ids(load(path, tiny, str(cache))) != fresh  # what the ids would be, unchecked
        monkeypatch.undo()
        calls = _count_tokenized_rows(monkeypatch)
    elif damage == "no checksum":
        checksum.unlink()
    else:
        checksum.write_text("{not json")
    heard.clear()
    again = _load_heard(path, tiny, str(cache), heard)
    notices = [h for h in heard if "deleted it, tokenizing again" in h]
    assert len(notices) == 1 and str(entry) in notices[0] and "\n" not in notices[0], heard
    assert {"flip": "does not match its checksum", "no checksum": "has no checksum",
            "bad checksum file": "unreadable checksum file"}[damage] in notices[0]
    assert sum(calls) == 30 and _ids(again) == fresh
    assert entry.read_bytes() == written and checksum.exists()
