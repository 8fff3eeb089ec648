"""The names a run directory's files and records go by, shared by the writers
(`metrics`) and the readers and forwarders (`trackers`, `run_plots`, `sweep_report`);
imports nothing, so the config's light modules can read them."""

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
LAUNCH_LOGS_DIR = "logs"  # `mmpo-jax launch`'s per-process logs: this machine's own
EVAL_PREFIX = "eval/"  # an eval record's keys: eval/<metric>
