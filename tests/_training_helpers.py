"""Shared machinery of test_training / test_checkpoints / test_multihost.

Run as a script it is `train.py` with test hooks, all off unless their environment variable is set:

  JAXDIFF_TEST_STEP_DELAY=s      sleep s seconds after each step (so a run can be killed mid-way)
  JAXDIFF_TEST_NAN_AT_STEP=k     the batch of training step k (1-based) is NaN
  JAXDIFF_TEST_KILL_IN_SAVE=n    SIGKILL this process inside the n-th checkpoint save, after the
                                 data is written and just before orbax's commit rename

Every subprocess shares one persistent XLA compilation cache per pytest session, so a program is
compiled once per session (runs of the same config differ only in runtime flags).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
HELPER = Path(__file__).resolve()
TINY = REPO / "configs" / "tiny.py"
STEPS = 30  # the tiny reference run: checkpoints at 10, 20, 30; logs every 5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def env(cache_dir=None, devices: int | None = None, *, opt0: bool = True, **extra) -> dict:
    """The environment of a test subprocess: CPU, this checkout first on the path, `devices` host
    devices, LLVM -O0 (`opt0`: compiles the tiny models ~2x faster; runs compared with each other
    must all use the same flags), the persistent compilation cache in `cache_dir` (if given)."""
    e = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    e["JAX_PLATFORMS"] = "cpu"
    if cache_dir is not None:
        e["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
        e["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    flags = [f for f in e.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    if devices:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    if not opt0:  # conftest.py sets -O0 for the pytest process itself: not for this one
        flags = [f for f in flags if "xla_backend_optimization_level" not in f]
    elif not any("xla_backend_optimization_level" in f for f in flags):
        flags.append("--xla_backend_optimization_level=0")
    e["XLA_FLAGS"] = " ".join(flags)
    e.update({k: str(v) for k, v in extra.items()})
    return e


def train_cmd(workdir, data_dir, *overrides) -> list:
    return [sys.executable, str(HELPER), f"--config={TINY}", f"--workdir={workdir}",
            f"--config.data.data_dir={data_dir}", f"--config.train.steps={STEPS}",
            "--config.train.keep=3", *overrides]


def captioned_data_dir(tmp_path_factory):
    """The tfds data_dir the training tests share, with digits and digits_text prepared (idempotent)."""
    from jaxdiff.data import sources

    d = tmp_path_factory.getbasetemp() / "tfds"
    d.mkdir(exist_ok=True)
    for name in ("digits", "digits_text"):
        sources.prepare(name, str(d))
    return d


def run(cmd, environ, timeout=300, check=True) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, env=environ, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"command failed ({p.returncode}): {' '.join(map(str, cmd))}\n"
                             f"--- stderr ---\n{p.stderr[-6000:]}")
    return p


def run_workers(worker: str, modes, data_dir, root, cache, timeout: float = 600) -> dict:
    """Run tests/`worker` in each mode, side by side (`worker MODE DATA_DIR ROOT`); {mode: (exit status, stderr)}."""
    path = str(HELPER.parent / worker)
    procs = {m: subprocess.Popen([sys.executable, path, m, str(data_dir), str(root)], env=env(cache),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for m in modes}
    try:
        errs = {m: p.communicate(timeout=timeout)[1] for m, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    return {m: (p.returncode, errs[m]) for m, p in procs.items()}


def sigkill_hook(workdir, kill_at: int, checkpoint_every: int, last_words):
    """A train() step_hook that SIGKILLs this process right after step `kill_at` is dispatched, once the
    checkpoint of step `checkpoint_every` is complete (orbax renames the finished step into place), calling
    `last_words(step)` first (to write what the test reads)."""
    def hook(step):
        if step == kill_at:
            ckpt = Path(workdir) / "checkpoints" / str(checkpoint_every)
            deadline = time.time() + 120
            while not ckpt.is_dir() and time.time() < deadline:
                time.sleep(0.05)
            last_words(step)
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


def read_metrics(workdir) -> list[dict]:
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def losses(workdir) -> dict:
    return {m["step"]: m["loss"] for m in read_metrics(workdir) if "loss" in m}


def complete_steps(workdir) -> list[int]:
    d = Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def load_tree(workdir, step: int) -> dict:
    """The whole stored TrainState of `step` as nested dicts of numpy arrays."""
    import jax
    import orbax.checkpoint as ocp

    mgr = ocp.CheckpointManager(str(Path(workdir) / "checkpoints"), item_handlers=ocp.PyTreeCheckpointHandler(),
                                options=ocp.CheckpointManagerOptions(create=False))
    try:
        meta = mgr.item_metadata(step)
        tree = meta.tree if hasattr(meta, "tree") else meta
        target = jax.tree_util.tree_map(lambda m: np.zeros(m.shape, m.dtype), tree)
        args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
        return mgr.restore(step, args=ocp.args.PyTreeRestore(item=target, restore_args=args))
    finally:
        mgr.close()


def assert_trees_equal(a, b, rtol=0.0, atol=0.0):
    import jax

    la, ta = jax.tree_util.tree_flatten_with_path(a)
    lb, tb = jax.tree_util.tree_flatten_with_path(b)
    assert ta == tb, "tree structures differ"
    for (path, x), (_, y) in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        if rtol == 0 and atol == 0:
            assert np.array_equal(x, y), f"{jax.tree_util.keystr(path)} differs (max |d| = {np.max(np.abs(x - y))})"
        else:
            np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


TRAINING_METRICS = ("step", "loss", "mse", "vb", "grad_norm")  # a run's logged metrics without timings


def assert_resumed_as_reference(workdir, reference, steps: int, checkpoints: list[int]) -> None:
    """A run killed and resumed ended as its uninterrupted `reference`: the `checkpoints` complete, the final
    TrainState (at `steps`) equal bit for bit, the same training metrics logged."""
    assert complete_steps(workdir) == checkpoints
    assert_trees_equal(load_tree(workdir, steps), load_tree(reference, steps))
    strip = lambda ms: [{k: v for k, v in m.items() if k in TRAINING_METRICS} for m in ms]  # noqa: E731
    assert strip(read_metrics(workdir)) == strip(read_metrics(reference))


_SESSION = {}


def session(tmp_path_factory) -> dict:
    """Session-wide: XLA cache dir, prepared digits data dir, and the uninterrupted reference run."""
    base = tmp_path_factory.getbasetemp()
    if "ref" in _SESSION:
        return _SESSION
    cache = base / "xla_cache"
    data_dir = base / "tfds"
    cache.mkdir(exist_ok=True)
    data_dir.mkdir(exist_ok=True)
    from jaxdiff.data import sources as data_sources

    data_sources.prepare("digits", str(data_dir))
    ref = base / "reference"
    if not (ref / "DONE").exists():
        run(train_cmd(ref, data_dir), env(cache))
        (ref / "DONE").write_text("ok")
    _SESSION.update(cache=cache, data_dir=data_dir, ref=ref)
    return _SESSION


# --- the test-hooked train.py ------------------------------------------------------------------

def _install_hooks():
    from jaxdiff.train import loop as training

    delay = float(os.environ.get("JAXDIFF_TEST_STEP_DELAY", "0") or 0)
    nan_at = int(os.environ.get("JAXDIFF_TEST_NAN_AT_STEP", "0") or 0)
    kill_in_save = int(os.environ.get("JAXDIFF_TEST_KILL_IN_SAVE", "0") or 0)
    if delay > 0:
        orig_train = training.train

        def train(config, workdir, step_hook=None):
            return orig_train(config, workdir, step_hook=lambda s: time.sleep(delay))

        training.train = train
    if nan_at > 0:
        orig_batches = training.train_batches  # the loop's own name for it

        def train_batches(source, resolved, start, stop, *rest):
            for step, (images, labels) in enumerate(orig_batches(source, resolved, start, stop, *rest), start):
                if step + 1 == nan_at:  # data of step index `step` feeds training step step + 1
                    images = np.full_like(images, np.nan)
                yield images, labels

        training.train_batches = train_batches
    if kill_in_save > 0:
        from orbax.checkpoint._src.path import atomicity

        orig_finalize = atomicity.AtomicRenameTemporaryPath.finalize
        count = {"n": 0}

        async def finalize(self, *a, **k):
            if self.get_final().name.isdigit():  # the step directory (not an item inside it)
                count["n"] += 1
                if count["n"] == kill_in_save:
                    Path(os.environ["JAXDIFF_TEST_KILL_MARK"]).write_text(self.get_final().name)
                    os.kill(os.getpid(), signal.SIGKILL)
            return await orig_finalize(self, *a, **k)

        atomicity.AtomicRenameTemporaryPath.finalize = finalize


if __name__ == "__main__":
    import runpy

    _install_hooks()
    sys.argv = [str(REPO / "train.py")] + sys.argv[1:]
    runpy.run_path(str(REPO / "train.py"), run_name="__main__")
