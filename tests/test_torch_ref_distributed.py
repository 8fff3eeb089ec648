"""The PyTorch reference's `group=` path: two gloo processes, each with half the pairs,
must give the single-process loss, metrics and gradients on the whole batch."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from mmpo_jax.torch_ref import losses as tl  # noqa: E402

WORKER = textwrap.dedent(
    """
    import json, os, sys
    import numpy as np
    import torch, torch.distributed as dist
    from mmpo_jax.torch_ref import losses as tl

    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", rank=rank, world_size=2)
    data = np.load(sys.argv[1])
    n = data["pc"].shape[0] // 2
    part = slice(rank * n, (rank + 1) * n)
    xs = [torch.tensor(data[k][part], dtype=torch.float64, requires_grad=True)
          for k in ("pc", "pr", "rc", "rr")]
    mask = torch.tensor(data["mask"][part])
    out = {}
    for name, fn, kw in [
        ("mmpo", tl.mmpo_loss, dict(beta=0.1, aux_weight=0.0)),
        ("dpo", tl.dpo_loss, dict(beta=0.1)),
    ]:
        for x in xs:
            x.grad = None
        loss, metrics = fn(*xs, pair_mask=mask, group=dist.group.WORLD, **kw)
        loss.backward()
        out[name] = {"loss": float(loss), "metrics": {k: float(v) for k, v in metrics.items()},
                     "grads": [x.grad.tolist() for x in xs]}
    with open(sys.argv[2] + f".{rank}", "w") as f:
        json.dump(out, f)
    dist.destroy_process_group()
    """
)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_group_equals_single_process(tmp_path):
    rng = np.random.default_rng(0)
    n = 10
    data = {
        "rc": -rng.uniform(5, 200, n),
        "rr": -rng.uniform(5, 200, n),
        "pc": -rng.uniform(1, 5, n),
        "mask": (np.arange(n) != 3).astype(np.float64),
    }
    data["pr"] = data["pc"] + rng.normal(0, 0.5, n)
    # the global extreme sits in the second process's half only
    data["rc"][7] = -1000.0
    np.savez(tmp_path / "data.npz", **data)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2")
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(tmp_path / "data.npz"), str(tmp_path / "out")],
            env=dict(env, RANK=str(r)),
        )
        for r in range(2)
    ]
    assert [p.wait(timeout=600) for p in procs] == [0, 0]
    parts = [json.loads((tmp_path / f"out.{r}").read_text()) for r in range(2)]

    xs = [torch.tensor(data[k], dtype=torch.float64, requires_grad=True) for k in ("pc", "pr", "rc", "rr")]
    mask = torch.tensor(data["mask"])
    for name, fn, kw in [
        ("mmpo", tl.mmpo_loss, dict(beta=0.1, aux_weight=0.0)),
        ("dpo", tl.dpo_loss, dict(beta=0.1)),
    ]:
        for x in xs:
            x.grad = None
        loss, metrics = fn(*xs, pair_mask=mask, **kw)
        loss.backward()
        for part in parts:
            np.testing.assert_allclose(part[name]["loss"], loss.item(), rtol=1e-12)
            for k, v in metrics.items():
                np.testing.assert_allclose(part[name]["metrics"][k], float(v), rtol=1e-12, err_msg=k)
        for i, x in enumerate(xs):
            joined = np.concatenate([parts[0][name]["grads"][i], parts[1][name]["grads"][i]])
            np.testing.assert_allclose(joined, x.grad.numpy(), rtol=1e-12, atol=1e-15)
