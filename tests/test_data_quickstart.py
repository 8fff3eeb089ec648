"""The data pipeline on a fresh machine (the Quick start): a missing package is not bad
data and is never cached, what `log` hears per source, and bad JSON lines as bad rows."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from mmpo_jax.config_schema import DataConfig
from mmpo_jax.data import formats, sources
from mmpo_jax.data.json_rows import read_json_rows
from mmpo_jax.data.pipeline import load_preference_data
from mmpo_jax.data.tokenized import tokenized_cache_dir
from mmpo_jax.data.tokenizers import load_tokenizer
from mmpo_jax.errors import UserError

JINJA2_MISSING = (
    "apply_chat_template requires jinja2 to be installed. "
    "Please install it using `pip install jinja2`."
)  # transformers' message (transformers/utils/chat_template_utils.py)


def msgs(role: str, text: str) -> list[dict[str, str]]:
    return [{"role": role, "content": text}]


def conv_rows(n: int, bad_roles: int = 0) -> list[dict]:
    return [
        {
            "prompt": msgs("tool" if i < bad_roles else "user", f"q{i}"),
            "chosen": msgs("assistant", f"a{i}"),
            "rejected": msgs("assistant", f"b{i}"),
        }
        for i in range(n)
    ]


def std_rows(n: int) -> list[dict]:
    return [
        {"prompt": f"{i} + {i} =", "chosen": f" {2 * i}", "rejected": f" {2 * i + 1}"}
        for i in range(n)
    ]


def write_lines(path: Path, lines: list) -> str:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return str(path)


def load(path: str, tok, cache: str, log=None, **kw):
    cfg = DataConfig(train_files=path, cache_dir=cache, **kw)
    return load_preference_data(cfg, "train", tok, log)


def cache_files(cache: str) -> list[str]:
    root = tokenized_cache_dir(cache)
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def cache_entries(cache: str) -> int:
    """Cached sources: each an `.arrow` file with its `.sha256.json` beside it, nothing else."""
    names = cache_files(cache)
    arrows = [n for n in names if n.endswith(".arrow")]
    assert sorted(names) == sorted(arrows + [a.removesuffix(".arrow") + ".sha256.json" for a in arrows]), names
    return len(arrows)


@pytest.fixture
def counted(monkeypatch):
    """The rows `formats.tokenize_records` is called on (0: everything came from the cache)."""
    calls: list[int] = []
    original = formats.tokenize_records

    def counting(batch, **kw):
        calls.append(len(batch["prompt"]))
        return original(batch, **kw)

    monkeypatch.setattr(formats, "tokenize_records", counting)
    return calls


# --------------------------------------------------------------------------- #
# A. A missing package stops tokenization and leaves no cache
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize(
    "error",
    [ImportError(JINJA2_MISSING), ModuleNotFoundError("No module named 'jinja2'", name="jinja2")],
    ids=["transformers", "module-not-found"],
)
def test_missing_jinja2_is_not_cached(tmp_path, monkeypatch, counted, error):
    tok = load_tokenizer("builtin:tiny")
    path = write_lines(tmp_path / "conv.jsonl", conv_rows(10))
    cache = str(tmp_path / "cache")

    def no_jinja(*args, **kwargs):
        raise error

    with monkeypatch.context() as m:
        m.setattr(tok, "apply_chat_template", no_jinja)
        with pytest.raises(UserError) as err:
            load(path, tok, cache)
    assert str(err.value) == (
        "data.tokenizer: the tokenizer's chat template needs the package 'jinja2', which is "
        "not installed here: pip install jinja2 (then run the same command again)"
    )
    assert cache_files(cache) == []  # no cache file, and no temporary file of datasets'
    # jinja2 installed: the same records (the same fingerprint) tokenize for real
    counted.clear()
    data = load(path, tok, cache)
    assert sum(counted) == 10 and data.report.sources[0].kept == 10
    assert not data.report.sources[0].dropped
    assert cache_entries(cache) == 1


def test_transformers_without_jinja2(tmp_path, monkeypatch):
    """The real path: transformers finds no jinja2 and raises from its template compiler."""
    from transformers.utils import chat_template_utils as ctu

    if not hasattr(ctu, "is_jinja_available") or not hasattr(ctu, "_compile_jinja_template"):
        pytest.skip("this transformers checks for jinja2 elsewhere")
    monkeypatch.setattr(ctu, "is_jinja_available", lambda: False)
    ctu._compile_jinja_template.cache_clear()
    path = write_lines(tmp_path / "conv.jsonl", conv_rows(4))
    cache = str(tmp_path / "cache")
    try:
        with pytest.raises(UserError, match=r"needs the package 'jinja2'.*: pip install jinja2 "):
            load(path, load_tokenizer("builtin:tiny"), cache)
    finally:
        ctu._compile_jinja_template.cache_clear()
    assert cache_files(cache) == []


def test_machine_errors_are_not_row_errors():
    special = formats.SpecialIds(eos=2, pad=0, bos=None)

    class Broken:
        chat_template = "x"

        def __init__(self, error):
            self.error = error

        def __call__(self, texts):
            raise self.error

        def apply_chat_template(self, *args, **kwargs):
            raise self.error

    std = {"prompt": ["a"], "chosen": [" b"], "rejected": [" c"]}
    conv = {
        "prompt": [msgs("user", "a")],
        "chosen": [msgs("assistant", "b")],
        "rejected": [msgs("assistant", "c")],
    }
    with pytest.raises(UserError, match=r"tokenizer failed on this machine, not on a row \(Memory"):
        formats.tokenize_records(std, Broken(MemoryError()), "standard", special)
    disk_full = Broken(OSError(28, "No space left on device"))
    with pytest.raises(UserError, match=r"chat template failed on this machine.*No space left"):
        formats.tokenize_records(conv, disk_full, "conversational", special)
    old = ImportError(
        "apply_chat_template requires jinja2>=3.1.6 to be installed. Your version is 3.0.0. "
        "You can upgrade it with `pip install -U jinja2`."
    )
    with pytest.raises(UserError, match=re.escape("too old): pip install -U 'jinja2>=3.1.6' (")):
        formats.tokenize_records(conv, Broken(old), "conversational", special)
    with pytest.raises(UserError, match=r"needs a package that is not installed here \(cannot go"):
        formats.tokenize_records(std, Broken(ImportError("cannot go on")), "standard", special)
    # a template error is still the row's
    out = formats.tokenize_records(conv, Broken(ValueError("bad role")), "conversational", special)
    assert out["error"] == ["ValueError: bad role"]


def test_refused_source_leaves_no_cache(tmp_path, counted):
    tok = load_tokenizer("builtin:tiny")
    path = write_lines(tmp_path / "conv.jsonl", conv_rows(10, bad_roles=1))
    cache = str(tmp_path / "cache")
    refused = r"(?s)1 of 10 rows are invalid.*chat_template_error: 1 \(line 1\)"
    with pytest.raises(UserError, match=refused):
        load(path, tok, cache)
    assert cache_files(cache) == []
    # allowed, it is cached; refused later (a stricter limit), the cache entry goes
    load(path, tok, cache, max_invalid_fraction=0.2)
    assert cache_entries(cache) == 1
    counted.clear()
    with pytest.raises(UserError, match="1 of 10 rows are invalid"):
        load(path, tok, cache)
    assert counted == [] and cache_files(cache) == []


# --------------------------------------------------------------------------- #
# B. What `log` hears
# --------------------------------------------------------------------------- #
def test_log_says_tokenizing_then_reusing(tmp_path, capsys, monkeypatch):
    import datasets

    tok = load_tokenizer("builtin:tiny")
    path = write_lines(tmp_path / "t.jsonl", std_rows(20))
    cache = str(tmp_path / "cache")
    bars_during: list[bool] = []
    original = formats.tokenize_records

    def watching(batch, **kw):
        bars_during.append(datasets.are_progress_bars_disabled())
        return original(batch, **kw)

    monkeypatch.setattr(formats, "tokenize_records", watching)
    datasets.enable_progress_bars()
    heard: list[str] = []
    load(path, tok, cache, log=heard.append)
    assert heard[0] == f"tokenizing 20 rows of {path}"
    assert re.fullmatch(rf"{re.escape(path)}: 20 rows kept, 0 dropped \(\d+\.\d s\)", heard[1])
    assert len(heard) == 2
    assert bars_during == [True] and not datasets.are_progress_bars_disabled()  # restored
    assert "Tokenizing" not in capsys.readouterr().err  # datasets' own bar stayed quiet
    heard.clear()
    load(path, tok, cache, log=heard.append)
    assert heard[0] == f"reusing the tokenized cache of {path} (20 rows)"
    assert heard[1].startswith(f"{path}: 20 rows kept, 0 dropped (")
    # dropped rows, by reason
    mixed = write_lines(
        tmp_path / "m.jsonl", std_rows(8) + [{"prompt": "q", "chosen": "a"}, "{oops"]
    )
    heard.clear()
    load(mixed, tok, cache, log=heard.append, max_invalid_fraction=0.5)
    assert heard[0] == f"tokenizing 8 rows of {mixed}"
    assert heard[1].startswith(
        f"{mixed}: 8 of 10 rows kept, 2 dropped (invalid_json 1, missing_field 1) ("
    )
    # without log: nothing is said, and the bars are left as they are
    datasets.disable_progress_bars()
    try:
        load(path, tok, cache)
        assert datasets.are_progress_bars_disabled()
    finally:
        datasets.enable_progress_bars()


# --------------------------------------------------------------------------- #
# C. Bad JSON lines are bad rows
# --------------------------------------------------------------------------- #
def test_bad_json_lines_are_counted_rows(tmp_path):
    tok = load_tokenizer("builtin:tiny")
    cache = str(tmp_path / "cache")
    lines = std_rows(200)
    lines[50] = '{"prompt": "q", "chosen": "a",'  # line 51: cut short
    path = write_lines(tmp_path / "one_bad.jsonl", lines)
    data = load(path, tok, cache)  # 1 in 200 is within data.max_invalid_fraction=0.01
    src = data.report.sources[0]
    assert (src.rows_read, src.kept, src.invalid) == (200, 199, 1)
    assert src.dropped["invalid_json"].rows == [51]
    assert src.line_errors["invalid_json"].startswith("line 51, column 31: not valid JSON (")
    assert f"{path} line 52" == data.origin(50)  # the rows after it keep their line numbers

    # every kind of bad line; blank lines are not rows
    kinds = std_rows(6) + [
        "[1, 2]",  # 7: JSON, not an object
        '"text"',  # 8
        "[" * 100_000,  # 9: deeper than json can read (RecursionError)
        "",  # 10: blank
        "   ",  # 11: blank
        "{'single': 'quotes'}",  # 12
    ]
    path = write_lines(tmp_path / "kinds.jsonl", kinds)
    with open(path, "ab") as f:
        f.write(b'{"prompt": "\xff"}\n')  # 13: not UTF-8
    data = load(path, tok, cache, max_invalid_fraction=0.6)
    src = data.report.sources[0]
    dropped = {k: d.rows for k, d in src.dropped.items()}
    assert dropped == {"not_an_object": [7, 8], "invalid_json": [9, 12, 13]}
    assert (src.rows_read, src.kept) == (11, 6)
    assert src.line_errors["invalid_json"] == "line 9: not valid JSON (nested too deeply to read)"
    assert src.line_errors["not_an_object"] == (
        "line 7: expected a JSON object with chosen/rejected, got list"
    )

    # a file of garbage stops with the reasons and their lines, as other bad rows do
    garbage = write_lines(tmp_path / "garbage.jsonl", ["oops", "{", "[1]", "nope"])
    with pytest.raises(UserError) as err:
        load(garbage, tok, cache)
    msg = str(err.value)
    assert "'" + garbage + "': 4 of 4 rows are invalid" in msg
    assert "invalid_json: 3 (lines 1, 2, 4)" in msg and "not_an_object: 1 (line 3)" in msg
    assert "first error: line 1, column 1: not valid JSON (Expecting value)" in msg
    # allowed, still nothing to train on
    with pytest.raises(UserError, match="no line of it is a JSON object"):
        load(garbage, tok, cache, max_invalid_fraction=1.0)


def test_bad_lines_count_in_a_fraction_and_in_json_files(tmp_path):
    tok = load_tokenizer("builtin:tiny")
    cache = str(tmp_path / "cache")
    lines = std_rows(10)
    lines[2] = "{bad"
    path = write_lines(tmp_path / "a.jsonl", lines)
    data = load_preference_data(
        DataConfig(mixture={path: 0.5}, cache_dir=cache, max_invalid_fraction=0.5), "train", tok
    )
    src = data.report.sources[0]
    # the first 5 lines: 4 rows and the bad line 3
    assert (src.rows_in_source, src.rows_read, src.kept) == (10, 5, 4)
    assert src.dropped["invalid_json"].rows == [3]
    # a .json file of JSON lines is read the same way
    json_lines = write_lines(tmp_path / "lines.json", lines)
    src = load(json_lines, tok, cache, max_invalid_fraction=0.5).report.sources[0]
    assert src.label == "line" and src.dropped["invalid_json"].rows == [3] and src.kept == 9
    # a .json document: a non-object item is a bad row; a broken document still stops
    doc = tmp_path / "doc.json"
    doc.write_text(json.dumps(std_rows(3) + [5]))
    src = load(str(doc), tok, cache, max_invalid_fraction=0.5).report.sources[0]
    assert src.label == "row" and src.dropped["not_an_object"].rows == [4] and src.kept == 3
    pretty = tmp_path / "pretty.json"
    pretty.write_text(
        '{\n  "data": [\n    {"prompt": "q", "chosen": "a" "rejected": "b"}\n  ]\n}\n'
    )
    with pytest.raises(UserError, match=r"pretty.json' is not valid JSON at line 3, column 35"):
        load(str(pretty), tok, cache)
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000)
    with pytest.raises(UserError, match=r"deep.json' is not valid JSON: nested too deeply"):
        load(str(deep), tok, cache)


def test_read_json_rows_still_raises_by_default(tmp_path):
    """`generate --prompts` reads with the default, and stops at a bad line."""
    path = tmp_path / "p.jsonl"
    write_lines(path, [{"prompt": "a"}, "{oops", "[1]"])
    with pytest.raises(UserError, match=r"--prompts: '.*p.jsonl' line 2, column 2: not valid"):
        read_json_rows(path, "--prompts")
    write_lines(path, [{"prompt": "a"}, "[1]"])
    with pytest.raises(UserError, match=r"line 2: expected a JSON object with chosen/rejec"):
        read_json_rows(path, "--prompts")
    write_lines(path, [{"prompt": "a"}, "[" * 100_000])
    with pytest.raises(UserError, match=r"line 2: not valid JSON \(nested too deeply to read\)"):
        read_json_rows(path, "--prompts")
    # and the win rate's reader (sources.read_source) too
    spec = sources.SourceSpec(str(path), "data.test_files")
    with pytest.raises(UserError, match=r"data.test_files: .* line 2: not valid JSON"):
        sources.read_source(spec)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_a_corrupt_cache_file_is_dropped_and_tokenized_again(tmp_path, damage):
    """A tokenized-cache file cut short (a full disk) or overwritten broke every run until
    deleted by hand: it is deleted with a notice, and the rows tokenize again, the same."""
    tok = load_tokenizer("builtin:tiny")
    path = write_lines(tmp_path / "t.jsonl", std_rows(20))
    cache = str(tmp_path / "cache")
    first = load(path, tok, cache)
    (entry,) = (tmp_path / "cache" / "mmpo_jax_tokenized").glob("*.arrow")
    data = entry.read_bytes()
    entry.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not arrow at all" * 64)
    heard: list[str] = []
    again = load(path, tok, cache, log=heard.append)
    notices = [h for h in heard if "cannot be read" in h]
    assert len(notices) == 1 and str(entry) in notices[0] and "tokenizing again" in notices[0], heard
    assert len(again) == len(first) == 20
    assert [again.pair(i) for i in range(20)] == [first.pair(i) for i in range(20)]
    assert again.report.sources[0].kept == 20 and not again.report.sources[0].dropped
    assert entry.read_bytes() == data  # written anew, whole
