"""`data.packing: packed` and `shared_prompt` against `none` on the tiny model in
float32, every loss the
issue names x full fine-tuning and LoRA (and the precomputed reference): 5 train steps
and the eval of the first test batches on each layout, the same data and seed.
`--layouts` picks the layouts (default both).

Prints one line per case with the largest relative difference of the losses and
log-probs, of the rewards (relative to beta x |log-prob|, their float32 noise), and of
the grad norm, then one JSON object; exits 1 if a case is past 1e-5 (grad norm 1e-4).

    JAX_PLATFORMS=cpu python benchmarks/packing_exactness.py [--layouts shared_prompt]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

CASES = {
    "mmpo-full": ["loss.name=mmpo"],
    "mmpo-lora": ["loss.name=mmpo", "model.lora.rank=4", "optim.learning_rate=1e-2"],
    "dpo-full": ["loss.name=dpo"],
    "dpo-lora": ["loss.name=dpo", "model.lora.rank=4", "optim.learning_rate=1e-2"],
    "simpo-full": ["loss.name=simpo"],
    "simpo-lora": ["loss.name=simpo", "model.lora.rank=4", "optim.learning_rate=1e-2"],
    "dpo-full-precomputed-2x2-accum2": ["loss.name=dpo", "model.reference=precomputed", "mesh.data=2",
                                        "mesh.fsdp=2", "optim.grad_accum=2"],
}
BASE = ["optim.learning_rate=3e-3", "optim.warmup_steps=0", "train.max_steps=10", "mesh.data=1"]
STEPS = 5
EVAL_BATCHES = 4


def history(overrides: list[str], data, test) -> list[dict[str, float]]:
    """The 5 steps' metrics, then the eval batches' metrics."""
    import jax

    from mmpo_jax.config import load_config
    from mmpo_jax.data.batches import eval_batches, train_batches
    from mmpo_jax.train.reference_cache import compute_table
    from mmpo_jax.data.layout import device_batch
    from mmpo_jax.train.setup import build_trainer, initial_reference

    cfg = load_config("configs/tiny.yaml", BASE + overrides)
    shards = cfg.mesh.data * max(cfg.mesh.fsdp, 1)
    trainer = build_trainer(cfg, devices=jax.devices()[:shards])
    tables = (None, None)
    if cfg.model.reference == "precomputed":
        ref = initial_reference(trainer)
        tables = tuple(compute_table(cfg, ref, d, trainer.mesh) for d in (data, test))
    batches = train_batches(data, cfg.data.batch_size, cfg.data.seed, packing=trainer.packing)
    state, out = trainer.state, []
    for step in range(STEPS):
        state, metrics = trainer.train_step(state, device_batch(batches[step], trainer.mesh, tables[0]))
        out.append({k: float(v) for k, v in jax.device_get(metrics).items()})
    evals = eval_batches(test, cfg.data.batch_size, packing=trainer.packing)
    for b in range(EVAL_BATCHES):
        metrics = trainer.eval_step(state, device_batch(evals[b], trainer.mesh, tables[1]))
        out.append({k: float(v) for k, v in jax.device_get(metrics).items()})
    return out


def differences(got: list[dict], want: list[dict], beta: float = 0.1) -> dict[str, float]:
    worst = {"loss_and_logps": 0.0, "rewards": 0.0, "grad_norm": 0.0}
    for a, b in zip(got, want):
        scale = beta * max(abs(b["logps/chosen"]), abs(b["logps/rejected"]))
        for key, want_v in b.items():
            diff = abs(a[key] - want_v)
            if key in ("rewards/accuracies", "mmpo/score_accuracy", "nonfinite", "learning_rate"):
                continue
            if key.startswith(("rewards/", "mmpo/")):
                worst["rewards"] = max(worst["rewards"], diff / max(abs(want_v), scale))
            elif key == "grad_norm":
                worst["grad_norm"] = max(worst["grad_norm"], diff / abs(want_v))
            else:
                worst["loss_and_logps"] = max(worst["loss_and_logps"], diff / max(abs(want_v), 1e-6))
    return worst


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layouts", nargs="+", default=["packed", "shared_prompt"],
                    choices=["packed", "shared_prompt"])
    layouts = ap.parse_args(argv).layouts
    from mmpo_jax.config import load_config
    from mmpo_jax.data.pipeline import load_preference_data

    data_cfg = load_config("configs/tiny.yaml").data
    data, test = load_preference_data(data_cfg, "train"), load_preference_data(data_cfg, "test")
    results, ok = {}, True
    for case, overrides in CASES.items():
        want = history(overrides, data, test)
        for layout in layouts:
            name = f"{layout} {case}"
            worst = differences(history(overrides + [f"data.packing={layout}"], data, test), want)
            passed = worst["loss_and_logps"] <= 1e-5 and worst["rewards"] <= 1e-5 and worst["grad_norm"] <= 1e-4
            ok &= passed
            results[name] = {**worst, "passed": passed, "final_margin": want[STEPS - 1]["rewards/margins"]}
            print(f"{name:<48} loss/logps {worst['loss_and_logps']:.1e}  rewards {worst['rewards']:.1e}  "
                  f"grad norm {worst['grad_norm']:.1e}  {'ok' if passed else 'PAST THE TOLERANCE'}",
                  file=sys.stderr, flush=True)
    print(json.dumps(results))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
