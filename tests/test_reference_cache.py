"""The precomputed reference table's cache: reused only when its bytes match the checksum
stored beside it and it reads as finite float32 `[rows, 2]`; anything else (bit rot, an
edited, recast, truncated or pickled file, NaNs, no checksum) is said, moved aside and
recomputed to the same numbers."""

from __future__ import annotations

import io

import numpy as np
import pytest

from mmpo_jax.config import load_config
from mmpo_jax.errors import UserError
from mmpo_jax.train import reference_cache
from mmpo_jax.train.run_data import load_data
from mmpo_jax.train.setup import build_trainer, initial_reference


@pytest.fixture(scope="module")
def computed(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    cfg = load_config("configs/tiny.yaml", [f"train.output_dir={out}", "model.reference=precomputed",
                                            "data.batch_size=32"])
    trainer = build_trainer(cfg)
    data = load_data(cfg).test
    loads = []

    def table(log=lambda text: None):
        def load():
            loads.append(1)
            return initial_reference(trainer)
        return reference_cache.reference_table(cfg, load, data, "test", trainer.mesh, log)

    first = table()
    assert len(loads) == 1
    path = next((out / "reference_logps").glob("test-*.npy"))
    return table, loads, first, path


def _npy(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


@pytest.mark.slow
def test_a_verified_table_is_reused(computed):
    table, loads, first, path = computed
    said = []
    again = table(said.append)
    assert np.array_equal(again, first) and len(loads) == 1
    assert said == [f"reference log-probs (test): reusing {path} (checksum verified)"]


def _flip(body: bytes) -> bytes:
    data = bytearray(body)
    for i in range(200, min(len(data), 2200)):
        data[i] ^= 0xFF
    return bytes(data)


CORRUPTIONS = {
    "flipped bytes": (lambda t, body: _flip(body), "does not match its checksum"),
    "halved": (lambda t, body: _npy(t * np.float32(0.5)), "does not match its checksum"),
    "int64": (lambda t, body: _npy(t.astype(np.int64)), "does not match its checksum"),
    "truncated": (lambda t, body: body[: len(body) // 2], "does not match its checksum"),
    "pickled": (lambda t, body: _npy(np.array([{"a": 1}], dtype=object)), "does not match its checksum"),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_a_changed_table_is_moved_aside_and_recomputed(computed, kind):
    """Each of these was reused (rewards/rejected 0.33 -> 1.1e9) or failed every rerun."""
    table, loads, first, path = computed
    change, reason = CORRUPTIONS[kind]
    path.write_bytes(change(first, path.read_bytes()))
    before, said = len(loads), []
    again = table(said.append)
    assert len(loads) == before + 1, "the table was not recomputed"
    assert np.array_equal(again, first)
    assert any(reason in line and "moved to" in line and "recomputing" in line for line in said), said
    moved = sorted(path.parent.glob(f"{path.name}.bad-*"))
    assert moved and not str(moved[0]).endswith(".sha256.json")
    for stale in path.parent.glob(f"{path.name}.bad-*"):
        stale.unlink()


@pytest.mark.slow
def test_a_table_with_a_matching_checksum_is_still_checked(computed):
    """NaN or the wrong shape with the checksum recomputed to match: refused all the same."""
    table, loads, first, path = computed
    checksum = path.parent / f"{path.name}.sha256.json"
    for bad, reason in ((np.full_like(first, np.nan), "not finite float32"), (first[:3], "not finite float32"),
                        (None, "has no checksum")):
        if bad is None:
            checksum.unlink()
        else:
            import hashlib
            import json

            body = _npy(bad)
            path.write_bytes(body)
            checksum.write_text(json.dumps({"sha256": hashlib.sha256(body).hexdigest(), "rows": len(first)}))
        said, before = [], len(loads)
        assert np.array_equal(table(said.append), first) and len(loads) == before + 1
        assert any(reason in line for line in said), said
    for stale in path.parent.glob(f"{path.name}.bad-*"):
        stale.unlink()


def test_a_reference_that_gives_nan_is_named(computed, monkeypatch):
    """A non-finite reference pass is the reference model's fault, not the learning rate's."""
    table, loads, first, path = computed
    path.unlink()
    monkeypatch.setattr(reference_cache, "compute_table", lambda *a: np.where(np.arange(len(first))[:, None] == 3,
                                                                             np.nan, first).astype(np.float32))
    with pytest.raises(UserError, match=r"gives 1 of \d+ test pairs a non-finite log-prob \(first: pair 3\)"):
        table()
