"""metrics.jsonl (resume truncation, torn lines, strict JSON), TensorBoard events, throughput, progress."""

from __future__ import annotations

import io
import json
import math
import struct
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from mmpo_jax.train.metrics import (
    METRICS_FILE,
    TENSORBOARD_DIR,
    MetricsWriter,
    Progress,
    Throughput,
    format_duration,
    kept_lines,
    make_record,
)


def train_metrics(step: int) -> dict[str, float]:
    return {
        "loss": 1.0 / step,
        "rewards/accuracies": 0.5,
        "rewards/margins": 0.01 * step,
        "grad_norm": 2.0,
        "learning_rate": 1e-6 * step,
        "tokens_per_second": 1000.0 + step,
    }


def strict_records(path: Path) -> list[dict]:
    """Every line parsed with a JSON reader that refuses NaN/Infinity."""

    def refuse(name):
        raise AssertionError(f"non-strict JSON constant {name} in {path}")

    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n")
    return [json.loads(line, parse_constant=refuse) for line in text.splitlines()]


def steps_of(records: list[dict], key: str) -> list[int]:
    return [r["step"] for r in records if key in r]


def test_resume_drops_records_past_the_restored_step(tmp_path):
    with MetricsWriter(tmp_path, resume_step=0, tensorboard=False) as w:
        for step in range(1, 13):
            w.write(step, train_metrics(step))
            if step == 10:
                w.write(step, {"loss": 0.3, "rewards/accuracies": 0.75}, prefix="eval/")
    # the run crashed after step 12; its last checkpoint is step 10
    with MetricsWriter(tmp_path, resume_step=10, tensorboard=False) as w:
        records = strict_records(tmp_path / METRICS_FILE)
        assert steps_of(records, "loss") == list(range(1, 11))
        assert steps_of(records, "eval/loss") == [10]
        for step in (11, 12, 13):
            w.write(step, train_metrics(step))
    records = strict_records(tmp_path / METRICS_FILE)
    assert steps_of(records, "loss") == list(range(1, 14))  # each step once
    assert steps_of(records, "eval/loss") == [10]
    assert records[0] == {"step": 1, **train_metrics(1)}  # names kept as given, "step" first
    assert list(records[0]) == ["step", *train_metrics(1)]


def test_a_restart_before_the_first_checkpoint_leaves_each_record_once(tmp_path):
    """Killed before its first checkpoint, the run starts again at step 0 and makes its
    step-0 eval again: the first attempt's records must not stay beside the new ones."""
    for attempt in range(2):
        with MetricsWriter(tmp_path, resume_step=0, tensorboard=False) as w:
            w.write(0, {"loss": 0.7 + attempt}, prefix="eval/")
            w.write(1, train_metrics(1))
    records = strict_records(tmp_path / METRICS_FILE)
    assert steps_of(records, "eval/loss") == [0] and steps_of(records, "loss") == [1]
    assert records[0]["eval/loss"] == 1.7  # the second attempt's


def test_resume_keeps_the_metrics_file_mode(tmp_path):
    """The resume's rewrite (a temp file renamed over the original) keeps the file's
    permission bits; through `mkstemp` it used to come back 0600."""
    import os
    import stat

    with MetricsWriter(tmp_path, resume_step=0, tensorboard=False) as w:
        for step in (1, 2):
            w.write(step, train_metrics(step))
    path = tmp_path / METRICS_FILE
    os.chmod(path, 0o640)
    with MetricsWriter(tmp_path, resume_step=1, tensorboard=False):
        pass
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert steps_of(strict_records(path), "loss") == [1]


def test_torn_last_line_is_dropped(tmp_path):
    path = tmp_path / METRICS_FILE
    with MetricsWriter(tmp_path, resume_step=0, tensorboard=False) as w:
        for step in (1, 2, 3):
            w.write(step, {"loss": 0.5})
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"step": 4, "loss": 0.2')  # killed mid-line
    with MetricsWriter(tmp_path, resume_step=100, tensorboard=False) as w:
        w.write(4, {"loss": 0.25})
    expected = [(1, 0.5), (2, 0.5), (3, 0.5), (4, 0.25)]
    assert strict_records(path) == [{"step": s, "loss": v} for s, v in expected]
    assert not list(tmp_path.glob(f".{METRICS_FILE}.*"))  # no temp file left behind


def test_kept_lines_rules():
    text = '{"step": 1}\nnot json\n{"no_step": 1}\n{"step": 3, "x": 1}\n{"step": 2}\n{"step": 9}'
    kept, dropped, bad = kept_lines(text, resume_step=2)
    # the last line lacks its newline but is a whole record: past the step, so dropped
    assert kept == ['{"step": 1}\n', '{"step": 2}\n']
    assert (dropped, bad) == (2, ["not json", '{"no_step": 1}'])
    assert kept_lines('{"step": 1}', 5) == (['{"step": 1}\n'], 0, [])
    assert kept_lines('{"step": 1}\n{"ste', 5) == (['{"step": 1}\n'], 0, [])
    assert kept_lines("", 5) == ([], 0, [])


def test_corrupt_middle_line_warns(tmp_path):
    (tmp_path / METRICS_FILE).write_text('{"step": 1}\ngarbage\n{"step": 2}\n')
    with pytest.warns(UserWarning, match="dropped 1 line.*garbage"):
        MetricsWriter(tmp_path, resume_step=5, tensorboard=False).close()
    assert strict_records(tmp_path / METRICS_FILE) == [{"step": 1}, {"step": 2}]


def test_values_are_strict_json_numbers(tmp_path):
    metrics = {
        "loss": np.float32(0.25),
        "rewards/chosen": jnp.asarray(-1.5, jnp.bfloat16),
        "logps/chosen": jnp.array([-3.0]),  # a 1-element array is a scalar
        "nan": float("nan"),
        "inf": np.float64(-np.inf),
        "count": np.int64(7),
        "flag": True,
    }
    with MetricsWriter(tmp_path, resume_step=0, tensorboard=False) as w:
        record = w.write(np.int32(5), metrics)
    (line,) = strict_records(tmp_path / METRICS_FILE)
    assert line == record == {
        "step": 5,
        "loss": 0.25,
        "rewards/chosen": -1.5,
        "logps/chosen": -3.0,
        "nan": None,
        "inf": None,
        "count": 7,
        "flag": 1,
    }
    assert isinstance(line["count"], int) and isinstance(line["loss"], float)


def test_bad_values_name_the_metric():
    with pytest.raises(ValueError, match=r"metric 'eval/logps/chosen': expected a real scalar.*shape \(2,\)"):
        make_record(1, {"logps/chosen": np.zeros(2)}, prefix="eval/")
    with pytest.raises(ValueError, match="metric 'note'"):
        make_record(1, {"note": "hello"})
    with pytest.raises(ValueError, match="'step' appears twice"):
        make_record(1, {"step": 3})


def test_disabled_writer_writes_nothing(tmp_path):
    out = tmp_path / "run"
    with MetricsWriter(out, resume_step=0, enabled=False) as w:
        assert w.write(1, {"loss": 1.0}) == {"step": 1, "loss": 1.0}
    assert not out.exists()


# -- TensorBoard, read back with tensorboardX's protobuf classes --------------


def read_events(logdir: Path) -> list:
    """Events of every event file in `logdir`, parsed from the TFRecord framing."""
    from tensorboardX.proto import event_pb2

    events = []
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            # uint64 length, uint32 crc of it, payload, uint32 crc of the payload
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            payload = data[pos + 12 : pos + 12 + length]
            assert len(payload) == length, f"truncated record in {path}"
            events.append(event_pb2.Event.FromString(payload))
            pos += 12 + length + 4
    return events


def scalars(events) -> dict[tuple[str, int], float]:
    return {(v.tag, e.step): v.simple_value for e in events for v in e.summary.value}


def test_tensorboard_events_hold_the_scalars(tmp_path):
    with MetricsWriter(tmp_path, resume_step=0) as w:
        for step in (1, 2):
            w.write(step, {"loss": 0.5 * step, "rewards/accuracies": 0.25})
        w.write(2, {"loss": 0.125, "nan": float("nan")}, prefix="eval/")
    got = scalars(read_events(tmp_path / TENSORBOARD_DIR))
    assert got[("loss", 1)] == 0.5 and got[("loss", 2)] == 1.0
    assert got[("rewards/accuracies", 2)] == 0.25
    assert got[("eval/loss", 2)] == 0.125
    assert math.isnan(got[("eval/nan", 2)])

    # a resume at step 1 asks TensorBoard to hide the old events from step 2 on
    with MetricsWriter(tmp_path, resume_step=1) as w:
        w.write(2, {"loss": 7.0})
    # a second file, even within the same second as the first: nothing overwritten
    assert len(list((tmp_path / TENSORBOARD_DIR).glob("events.out.tfevents.*"))) == 2
    events = read_events(tmp_path / TENSORBOARD_DIR)
    assert scalars(events)[("eval/loss", 2)] == 0.125
    starts = [e.step for e in events if e.HasField("session_log")]
    assert starts and starts[-1] == 2
    assert events[-1].summary.value[0].tag == "loss" and events[-1].summary.value[0].simple_value == 7.0


# -- throughput and progress ---------------------------------------------------


def test_throughput_excludes_the_first_step_and_windows():
    t = Throughput(window=2)
    assert t.mark(500, now=0.0) is None  # the compile step: starts the clock only
    assert t.mark(100, now=10.0) == pytest.approx(10.0)
    assert t.mark(100, now=11.0) == pytest.approx(200 / 11)
    assert t.mark(100, now=12.0) == pytest.approx(100.0)  # window: marks at 10, 11, 12
    t.reset()
    assert t.rate() is None and t.mark(100, now=50.0) is None


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class TtyBuffer(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_prints_plain_lines_when_not_a_tty():
    clock, out = FakeClock(), io.StringIO()
    progress = Progress(25, plain_every=10, stream=out, clock=clock)
    for step in range(1, 24):
        clock.now = 2.0 * step  # 2 s per step
        progress.update(step, {"loss": 0.6931, "rewards/accuracies": 0.5, "grad_norm": 1.0}, 5120.0)
    progress.message("eval at step 23: loss 0.5")
    progress.close()  # stopped at 23 (e.g. SIGINT): its state is printed once
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert [line.split(" | ")[0] for line in lines] == [
        "step 1/25",
        "step 10/25",
        "step 20/25",
        "eval at step 23: loss 0.5",
        "step 23/25",
    ]
    assert lines[0] == "step 1/25 | loss 0.6931 | acc 0.500 | 5,120 tok/s"  # no rate yet: no ETA
    assert lines[1] == "step 10/25 | loss 0.6931 | acc 0.500 | 5,120 tok/s | ETA 0:00:30"


def test_progress_redraws_in_place_on_a_tty():
    clock, out = FakeClock(), TtyBuffer()
    progress = Progress(100, start_step=40, stream=out, clock=clock)
    clock.now = 1.0
    progress.update(41, {"loss": 123.456})
    clock.now = 1.5
    progress.update(42, {"loss": 0.5})
    progress.message("saved checkpoint 42")
    progress.pause()  # the save's time is not a step's
    clock.now = 100.0
    progress.update(43, {"loss": 0.5})  # the window restarts: the last rate holds
    progress.close()
    text = out.getvalue()
    assert text.startswith("\rstep 41/100 | loss 123.5")
    assert "\rstep 42/100 | loss 0.5 | ETA 0:00:29" in text
    assert "saved checkpoint 42\n" in text
    assert text.endswith("\rstep 43/100 | loss 0.5 | ETA 0:00:28\n")
    assert text.count("\n") == 2


def test_disabled_progress_prints_nothing():
    out = io.StringIO()
    progress = Progress(10, enabled=False, stream=out)
    progress.update(1, {"loss": 1.0}, 10.0)
    progress.message("hi")
    progress.close()
    assert out.getvalue() == ""


def test_format_duration():
    assert format_duration(0) == "0:00:00"
    assert format_duration(3725.4) == "1:02:05"
    assert format_duration(90000) == "25:00:00"
