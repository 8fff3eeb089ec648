"""The README's configuration table is the schema's: one row per key, each key's default
and the help its field carries (`mmpo_jax.config_table`); editing one without the other
fails here."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from mmpo_jax.config import config_to_dict, load_config
from mmpo_jax.config_schema import LossConfig, RunConfig
from mmpo_jax.config_table import BEGIN, END, render_table, table_rows, with_table

ROOT = Path(__file__).resolve().parents[1]


def _leaf_keys(tree: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in tree.items():
        if isinstance(value, dict) and key != "mixture":
            keys += _leaf_keys(value, f"{prefix}{key}.")
        else:
            keys.append(f"{prefix}{key}")
    return keys


def test_the_readme_table_is_the_schemas():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert readme.count(BEGIN) == 1 and readme.count(END) == 1
    assert with_table(readme) == readme, "README.md's config table differs: run python -m mmpo_jax.config_table"


def test_every_key_has_a_row_with_its_help():
    """Every key a config has (the default config's, `model.init` included) is one row."""
    keys = [key for key, _, _ in table_rows()]
    assert keys == _leaf_keys(config_to_dict(RunConfig()))
    assert all(meaning for _, _, meaning in table_rows())


def test_the_rows_show_the_defaults():
    rows = {key: default for key, default, _ in table_rows()}
    assert rows["data.max_length"] == "1024" and rows["model.lora.targets"] == "`[q, k, v, o]`"
    assert rows["optim.learning_rate"] == "5e-7" and rows["model.path"] == '`""`'
    assert rows["loss.beta"] == "0.1 / 2.0 for simpo"  # None shown as what it settles to
    assert "prompt \\| chosen \\| rejected" in render_table()  # a `|` in a cell is escaped


def test_the_help_lives_on_the_field():
    beta = next(f for f in dataclasses.fields(LossConfig) if f.name == "beta")
    assert beta.metadata["help"].startswith("reward scale")
    # the field's hint still names what to set for another tool's name
    with pytest.raises(Exception, match="set loss.name=dpo loss.loss_type=ipo"):
        load_config(None, ["loss.name=ipo"])


def test_check_mode_names_the_fix(tmp_path, monkeypatch, capsys):
    from mmpo_jax import config_table

    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{BEGIN}\n| stale |\n{END}\n", encoding="utf-8")
    monkeypatch.setattr(config_table, "README", readme)
    assert config_table.main(["--check"]) == 1
    assert "python -m mmpo_jax.config_table" in capsys.readouterr().err
    assert config_table.main([]) == 0 and config_table.main(["--check"]) == 0
