"""`mmpo-jax plot` (`mmpo_jax.run_plots`): curves of runs drawn from their metrics.jsonl,
checked against the values the test wrote."""

import json

import numpy as np
import pytest

from mmpo_jax import cli
from mmpo_jax.errors import UserError
from mmpo_jax.run_plots import runs_figure

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(path, losses, evals):
    """A run directory whose metrics.jsonl has train `loss` at steps 1.. and eval records."""
    path.mkdir(parents=True)
    lines = [{"step": s, "eval/rewards/accuracies": a, "eval/loss": 1 - a} for s, a in evals]
    lines += [{"step": i + 1, "loss": v, "grad_norm": 1.0} for i, v in enumerate(losses)]
    lines.sort(key=lambda r: r["step"])
    text = "".join(json.dumps(r) + "\n" for r in lines) + '{"step": 9, "loss": 0.'  # a torn last line
    (path / "metrics.jsonl").write_text(text)
    return path


@pytest.fixture
def runs(tmp_path):
    a = write_run(tmp_path / "a", [3.0, 2.0, None, 1.0], [(0, 0.5), (4, 0.75)])
    b = write_run(tmp_path / "b", [4.0, 3.5, 3.0, 2.5], [(0, 0.5), (4, 0.625)])
    return a, b


def _lines(ax):
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}


def test_one_panel_per_metric_each_run_its_values(runs):
    fig, plotted = runs_figure(list(runs), ["loss", "eval/rewards/accuracies"])
    assert plotted == ["loss", "eval/rewards/accuracies"] and len(fig.axes) == 2
    loss, acc = (_lines(ax) for ax in fig.axes)
    # the null loss of run a (a non-finite value) is left out, not drawn as 0
    assert loss == {"a": ([1, 2, 4], [3.0, 2.0, 1.0]), "b": ([1, 2, 3, 4], [4.0, 3.5, 3.0, 2.5])}
    assert acc == {"a": ([0, 4], [0.5, 0.75]), "b": ([0, 4], [0.5, 0.625])}
    assert [ax.get_title() for ax in fig.axes] == plotted


def test_default_metrics_are_those_the_runs_have(runs):
    _, plotted = runs_figure(list(runs))
    assert plotted == ["loss", "eval/loss", "eval/rewards/accuracies"]


def test_a_missing_metric_names_the_ones_there_are(runs):
    with pytest.raises(UserError, match="no run has eval/win_rate; the runs have: eval/loss, "
                                        "eval/rewards/accuracies, grad_norm, loss"):
        runs_figure(list(runs), ["loss", "eval/win_rate"])


def test_not_a_run_directory(tmp_path):
    with pytest.raises(UserError, match="has no metrics.jsonl"):
        runs_figure([tmp_path])


def test_the_command_writes_a_png(runs, tmp_path, capsys):
    out = tmp_path / "plots" / "both.png"
    assert cli.main(["plot", str(runs[0]), str(runs[1]), "--out", str(out), "--metrics", "loss,grad_norm"]) == 0
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert "wrote" in capsys.readouterr().out
    assert cli.main(["plot", str(runs[0])]) == 0  # one run: into its directory
    assert (runs[0] / "curves.png").read_bytes()[:8] == PNG_MAGIC
    assert cli.main(["plot", str(runs[0]), str(runs[1])]) == 2  # several runs need --out
    assert "give --out" in capsys.readouterr().err


def test_same_named_runs_are_told_apart(tmp_path):
    a = write_run(tmp_path / "x" / "run", [1.0], [])
    b = write_run(tmp_path / "y" / "run", [2.0], [])
    fig, _ = runs_figure([a, b], ["loss"])
    assert set(_lines(fig.axes[0])) == {str(a), str(b)}
    assert np.isclose(_lines(fig.axes[0])[str(b)][1][0], 2.0)
