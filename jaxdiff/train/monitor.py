"""What a training run reports about itself: metrics.jsonl and TensorBoard, throughput and device
memory, and a profiler-trace window.

* `MetricsWriter`: process 0 appends one JSON line per log interval to W/metrics.jsonl and writes
  the same scalars to TensorBoard event files in W/tensorboard (tensorboardX). A resumed run first
  drops the lines a killed run wrote after its checkpoint (they are recomputed).
* `throughput`: step time, images/s per device (and in all) over a log interval.
* `device_memory`: bytes in use / peak over this process's devices, where the backend reports them
  (`Device.memory_stats()`: GPUs and TPUs; the CPU reports nothing).
* `ProfileWindow`: a `jax.profiler` trace of the steps (start, stop] on process 0, written to
  W/profile (open with TensorBoard's profile plugin or Perfetto).

W may be a URL (gs://...): paths are etils.epath paths.
"""

from __future__ import annotations

import json
import logging
from typing import Mapping, Optional, Sequence

import jax
from etils import epath

from jaxdiff.util import files

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
PROFILE_DIR = "profile"
#: Metrics that measure the machine, not the model: they differ between two runs of one config.
TIMING_KEYS = ("steps_per_sec", "step_time", "images_per_sec", "images_per_sec_per_device",
               "memory_bytes_in_use", "memory_peak_bytes")


class MetricsWriter:
    """JSON lines in W/metrics.jsonl and TensorBoard scalars in W/tensorboard (process 0 only)."""

    def __init__(self, workdir: epath.Path, resume_step: int):
        self.enabled = jax.process_index() == 0
        self.path = workdir / METRICS_FILE
        self._remote = "://" in str(self.path)
        self._lines: list = []
        self.tb = None
        if not self.enabled:
            return
        if self.path.exists():
            for ln in self.path.read_text().splitlines(keepends=True):
                try:
                    if json.loads(ln).get("step", 0) <= resume_step:
                        self._lines.append(ln if ln.endswith("\n") else ln + "\n")
                except json.JSONDecodeError:
                    pass  # a torn last line of a killed run
            files.atomic_write(str(self.path), "".join(self._lines))
        from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(str(workdir / TENSORBOARD_DIR))

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        line = json.dumps({"step": int(step), **{k: float(v) for k, v in metrics.items()}}) + "\n"
        self._lines.append(line)
        if self._remote:  # object stores cannot append: rewrite the (small) file
            files.atomic_write(str(self.path), "".join(self._lines))
        else:
            with open(self.path, "a") as f:
                f.write(line)
        for k, v in metrics.items():
            self.tb.add_scalar(k, float(v), int(step))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def throughput(steps: int, seconds: float, global_batch: int) -> dict:
    """steps_per_sec, step_time (s), images_per_sec and images_per_sec_per_device of an interval."""
    seconds = max(float(seconds), 1e-9)
    images = steps * global_batch / seconds
    return {"steps_per_sec": steps / seconds, "step_time": seconds / max(steps, 1),
            "images_per_sec": images, "images_per_sec_per_device": images / jax.device_count()}


def device_memory(devices: Optional[Sequence] = None) -> dict:
    """{memory_bytes_in_use, memory_peak_bytes}: the largest over this process's devices; {} when
    the backend reports no memory statistics."""
    out: dict = {}
    for d in (jax.local_devices() if devices is None else devices):
        try:
            stats = d.memory_stats()
        except Exception:  # backends without the API
            stats = None
        if not stats:
            continue
        for key, name in (("bytes_in_use", "memory_bytes_in_use"), ("peak_bytes_in_use", "memory_peak_bytes")):
            if key in stats:
                out[name] = max(out.get(name, 0), int(stats[key]))
    return out


class ProfileWindow:
    """Trace the steps (start, stop] with jax.profiler on process 0 (`window` = () for none)."""

    def __init__(self, window: Sequence[int], directory: epath.Path):
        self.window = tuple(int(s) for s in window) if window else None
        self.directory = directory
        self.active = False

    def before_step(self, step: int) -> None:
        """Call with the number of steps done before dispatching the next one."""
        if self.window and step == self.window[0] and jax.process_index() == 0:
            jax.profiler.start_trace(str(self.directory))
            self.active = True

    def after_step(self, step: int, state) -> None:
        """Call with the number of steps done after dispatching one (waits for it at the end)."""
        if self.active and step >= self.window[1]:
            jax.block_until_ready(state)
            self.close()
            log.info("profiler trace of steps %d..%d written to %s", self.window[0] + 1, self.window[1],
                     self.directory)

    def close(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
