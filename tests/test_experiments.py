"""experiments/beta_sweep: its configs, its committed results and its README agree.

The experiment itself takes ~45 minutes and is not rerun here; these checks catch a
README quoting numbers the CSV does not hold, results left over from another grid, or a
config the trainer no longer accepts.
"""

from __future__ import annotations

import csv
import importlib.util
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from mmpo_jax.cli import main
from mmpo_jax.config import load_config

ROOT = Path(__file__).resolve().parents[1]
EXP = ROOT / "experiments" / "beta_sweep"


def _report_module():
    spec = importlib.util.spec_from_file_location("beta_sweep_report", EXP / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sweep_args() -> list[str]:
    """`sweep ...`: run.sh's `mmpo-jax sweep` command line (its continued lines joined)."""
    text = (EXP / "run.sh").read_text().replace("\\\n", " ")
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("mmpo-jax sweep "))
    return shlex.split(line.replace("$HERE", str(EXP.relative_to(ROOT))))[1:]


def test_configs_load_and_the_sweep_starts_from_the_sft_export():
    sft = load_config(EXP / "sft.yaml")
    sweep = load_config(EXP / "sweep.yaml")
    assert sft.loss.name == "sft" and sft.model.path == ""
    run_sh = (EXP / "run.sh").read_text()
    # run.sh exports the SFT run to the directory every sweep run starts from
    assert 'mmpo-jax export "$HERE/runs/sft" "$HERE/runs/sft_model"' in run_sh
    assert sweep.model.path == "experiments/beta_sweep/runs/sft_model"
    assert sft.train.output_dir == "experiments/beta_sweep/runs/sft"
    # same tokenizer (the sweep reads the SFT export's own, which the export writes from the
    # SFT run's builtin:tiny) and sequence shapes in both stages
    assert sft.data.tokenizer == "builtin:tiny" and sweep.data.tokenizer == sweep.model.path
    assert (sweep.data.max_length, sweep.data.max_prompt_length) == (sft.data.max_length, sft.data.max_prompt_length)


def test_the_model_has_at_most_10m_parameters():
    init = load_config(EXP / "sft.yaml").model.init
    d, v, inter, layers = init.hidden_size, init.vocab_size, init.intermediate_size, init.num_hidden_layers
    head_dim = d // init.num_attention_heads
    kv = init.num_key_value_heads * head_dim
    per_layer = d * d + 2 * d * kv + d * d + 3 * d * inter + 2 * d  # q, k, v, o, MLP, two norms
    total = v * d * (1 if init.tie_word_embeddings else 2) + layers * per_layer + d
    assert total <= 10_000_000
    assert f"{total:,} parameters" in (EXP / "sft.yaml").read_text()


def test_run_sh_is_valid_bash():
    subprocess.run(["bash", "-n", str(EXP / "run.sh")], check=True)
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", str(EXP / "run.sh")], check=True)


def test_the_committed_summary_is_the_run_sh_grid(capsys, monkeypatch):
    """Every run run.sh's sweep plans is in summary.csv, in order, finished, with the
    losses' settings of its name: no stale or missing results."""
    monkeypatch.chdir(ROOT)  # run.sh's paths are relative to the checkout
    assert main([*_sweep_args(), "--dry-run"]) == 0
    planned = re.findall(r"^\[\d+/\d+\] (\S+):", capsys.readouterr().out, flags=re.M)
    with (EXP / "results" / "summary.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == planned and len(planned) == 27
    assert all(r["status"] == "ok" for r in rows)
    for r in rows:
        assert r["run"].startswith(r["loss"]) and f"beta{float(r['beta']):g}" in r["run"]
        assert ("aux_weight0" in r["run"]) == (r["aux_weight"] == "0")
        assert ("normalize_none" in r["run"]) == (r["normalize"] == "none")
    for name in ("win_rate_vs_capability.png", "training_curves.png"):
        assert (EXP / "results" / name).stat().st_size > 10_000


def test_readme_tables_are_the_report_of_the_summary():
    report = _report_module().report(EXP / "results" / "summary.csv")
    assert report.strip() in (EXP / "README.md").read_text()


@pytest.mark.parametrize("row,family", [
    ({"loss": "mmpo", "aux_weight": "1", "normalize": "minmax", "entropy_weight": "0"}, "MMPO (aux_weight 1, the paper's)"),
    ({"loss": "mmpo", "aux_weight": "0", "normalize": "minmax", "entropy_weight": "0"}, "MMPO without aux (aux_weight 0)"),
    ({"loss": "mmpo", "aux_weight": "1", "normalize": "none", "entropy_weight": "0"}, "MMPO, normalize none (aux 1)"),
    ({"loss": "mmpo", "aux_weight": "1", "normalize": "minmax", "entropy_weight": "0.1"}, None),
    ({"loss": "dpo", "aux_weight": "", "normalize": "", "entropy_weight": ""}, "DPO"),
    ({"loss": "simpo", "aux_weight": "", "normalize": "", "entropy_weight": ""}, "SimPO"),
])
def test_report_families(row, family):
    assert _report_module().family(row) == family
