"""sample.py across processes: shards written as they go, resumed after kill -9, merged in sample-id
order, refused into another run's OUT; the same file for 1 device, 2 processes x 4 devices and 3
processes x 1 device."""

import os
import pathlib
import re
import shutil
import subprocess
import sys

import _tiny
import _training_helpers as H
import numpy as np
import pytest

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
N, BS = 1000, 100  # 10 global batches: 100 rows; 50 (padded to 52) or 34/33/33 (padded to 34) a process
SETTINGS = ["--config.sample.sampler=ddim", "--config.sample.steps=3", f"--config.sample.num_samples={N}",
            f"--config.sample.batch_size={BS}", "--config.sample.grid_max=16"]
KILL_AFTER = 3  # process 1 of the interrupted run SIGKILLs itself after writing its 3rd shard


class _Runs:
    def __init__(self, root):
        from jaxdiff.convert import converted

        self.root, self.cache = root, root / "xla"
        m, p = _tiny.unet()
        converted.save_converted(root / "model", p, "unet", dict(_tiny.UNET_FLAGS),
                               dict(noise_schedule="cosine", diffusion_steps=100, learn_sigma=True))

    def start(self, name, processes, devices, extra=(), kill=None):
        """`processes` sample.py processes (devices each) into root/name; returns [(Popen, log path)]."""
        env = H.env(devices=devices, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_LOG_COMPILES="1")
        cmd = [sys.executable, str(HERE / "_sample_worker.py"), "--config", str(ROOT / "configs" / "sample.py"),
               f"--config.model={self.root / 'model'}", f"--config.out={self.root / name}",
               f"--jax_cache_dir={self.cache}", *SETTINGS, *extra]
        port, procs = H.free_port(), []
        for i in range(processes):
            multi = [f"--coordinator_address=localhost:{port}", f"--num_processes={processes}",
                     f"--process_id={i}"] if processes > 1 else []
            log = self.root / f"{name}.{len(list(self.root.glob(name + '.*.log')))}.{i}.log"
            e = dict(env, JAXDIFF_TEST_KILL_AFTER_SHARDS=str((kill or {}).get(i, 0)))
            procs.append((subprocess.Popen(cmd + multi, env=e, stdout=open(log, "w"), stderr=subprocess.STDOUT), log))
        return procs

    @staticmethod
    def wait(procs, timeout=300):
        try:
            for p, _ in procs:
                p.wait(timeout=timeout)
        finally:
            for p, _ in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        return [(p.returncode, log.read_text()) for p, log in procs]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    r = _Runs(tmp_path_factory.mktemp("shards"))
    one = r.start("one", 1, 1)
    killed = r.start("two", 2, 4, kill={1: KILL_AFTER})
    three = r.start("three", 3, 1, extra=["--config.sample.progress=True"])
    r.logs = {"one": r.wait(one), "three": r.wait(three)}
    (p0, _), (p1, _) = killed
    p1.wait(timeout=300)  # it kills itself; process 0 then waits on it in a collective: kill it too
    p0.kill()
    r.logs["killed"] = r.wait(killed)
    r.after_kill = sorted(os.listdir(r.root / "two" / "shards"))
    shutil.copytree(r.root / "two", r.root / "killed_copy")
    r.cache_after_first = os.listdir(r.cache)
    r.logs["resumed"] = r.wait(r.start("two", 2, 4))
    for name in ("one", "three", "resumed"):
        for rc, log in r.logs[name]:
            assert rc == 0, f"{name}: exit {rc}\n{log[-4000:]}"
    return r


def _load(path):
    with np.load(path) as z:
        return z["arr_0"], z["arr_1"]


def test_same_merged_file_for_any_device_or_process_count_and_after_kill_9(runs):
    """1 device; 3 processes x 1 device; 2 processes x 4 devices, killed (-9) mid-run and rerun."""
    ref_images, ref_labels = _load(runs.root / "one" / "samples.npz")
    assert ref_images.shape == (N, 8, 8, 3) and ref_images.dtype == np.uint8 and ref_images.std() > 10
    np.testing.assert_array_equal(ref_labels, np.arange(N) % _tiny.NUM_CLASSES)  # sample-id order
    for name in ("three", "two"):
        out = runs.root / name
        assert sorted(os.listdir(out)) == ["grid.png", "samples.npz"]  # shards merged, then deleted
        images, labels = _load(out / "samples.npz")
        np.testing.assert_array_equal(labels, ref_labels)
        diff = np.abs(images.astype(int) - ref_images.astype(int))
        # float32 rounding may differ with the per-device batch shape and move a value by one step
        print(f"{name}: {np.count_nonzero(diff)} of {diff.size} uint8 values differ from 1 device's, max {diff.max()}")
        assert diff.max() <= 1 and np.count_nonzero(diff) <= 10


def test_progress_bar_on_process_0_only(runs):
    # the program has no progress callback: the bar moves per batch, from the host
    bars = [f"ddim x{-(-N // BS)} batches" in log for _, log in runs.logs["three"]]
    assert bars == [True, False, False], runs.logs["three"][0][1][-2000:]


def test_rerun_after_kill_9_generates_only_missing_batches_from_cached_program(runs):
    (rc0, _), (rc1, _) = runs.logs["killed"]
    assert rc1 == -9 and rc0 != 0  # process 0: killed by the fixture (or failed on its own)
    names = set(runs.after_kill) - {"manifest.json"}
    assert "manifest.json" in runs.after_kill and len(names) >= 2 * KILL_AFTER - 1
    assert all(re.fullmatch(r"\d{8}-\d{8}\.npz", n) for n in names), names  # no temporaries kept

    def complete(b):
        halves = np.array_split(np.arange(b * BS, min(b * BS + BS, N)), 2)
        return all(f"{h[0]:08d}-{h[-1] + 1:08d}.npz" in names for h in halves)

    batches = -(-N // BS)
    todo = sum(not complete(b) for b in range(batches))
    assert batches - todo >= KILL_AFTER - 1
    out0 = runs.logs["resumed"][0][1]
    assert f"sampled {todo} of {batches} batches, {batches - todo} were already in its shards/" in out0, out0[-2000:]
    # --jax_cache_dir: the killed run stored the sampler (no host callback in it, so JAX keeps it);
    # the rerun's process 0 loaded it instead of compiling (JAX_LOG_COMPILES reports hits; JAX writes
    # entries from process 0 only, and on the CPU other processes' keys differ)
    assert [n for n in runs.cache_after_first if n.startswith("jit_run-")], runs.cache_after_first
    assert "Persistent compilation cache hit for 'jit_run'" in out0, out0[-3000:]


def _config(out, **sample):
    from jaxdiff.sample import runner

    cfg = runner.default_config()
    cfg.model, cfg.out = str(cfg.model), str(out)
    cfg.sample.update(dict(sampler="ddim", steps=3, num_samples=N, batch_size=BS, grid_max=16), **sample)
    return cfg


def _snapshot(directory):
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(pathlib.Path(directory).rglob("*"))
            if p.is_file()}


def test_other_settings_refused_complete_run_not_redone(runs, monkeypatch):
    from jaxdiff import checkpoints
    from jaxdiff.diffusion import samplers
    from jaxdiff.sample import __main__, runner

    def no_compile(*a, **k):
        raise AssertionError("a sampler was built")

    monkeypatch.setattr(samplers, "make_sampler", no_compile)
    model = checkpoints.load_model(str(runs.root / "model"))
    killed, one = runs.root / "killed_copy", runs.root / "one"
    before = {d: _snapshot(d) for d in (killed, one)}
    with pytest.raises(ValueError) as e:
        runner.run(_config(killed, seed=1, steps=4), model=model, shards=True)
    assert "shards made with other settings: sample.seed=1 here, 0 there; sample.steps=4 here, 3 there" in str(e.value)
    with pytest.raises(ValueError, match=r"samples.npz holds samples made with other settings: sample.classes='0,2' "):
        runner.run(_config(one, classes="0,2"), model=model, shards=True)
    # the same settings into the complete OUT: nothing to do (progress and grid_max do not count)
    res = runner.run(_config(one, progress=False, grid_max=4), model=model, shards=True)
    assert res["generated"] == 0 and res["npz"] == str(one / "samples.npz")
    assert {d: _snapshot(d) for d in (killed, one)} == before  # nothing written, deleted or mixed
    # merging an incomplete run names the missing ids
    with pytest.raises(ValueError, match=r"killed_copy/shards lacks \d+ of the 1000 samples \(ids \d+\.\."):
        __main__.main(["merge", str(killed)])


def test_shards_of_different_process_counts_resume_and_merge_in_id_order(tmp_path):
    """Shards from runs with 2 and 3 processes overlap; a batch counts as done when its ids are covered."""
    from jaxdiff.sample import shards
    from jaxdiff.util import files

    out = str(tmp_path / "out")
    manifest = {"format": shards.MANIFEST_FORMAT, "sample": {"num_samples": 14, "batch_size": 10}}
    files.write_json(tmp_path / "out" / "shards" / "manifest.json", manifest)
    images = np.arange(14, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)
    labels = np.arange(14) % 3
    for lo, hi in [(0, 5), (4, 7), (10, 12)]:  # batch 0 split 5/5 and 4/3/3; batch 1 (10..13) half done
        shards.write_shard(out, np.arange(lo, hi), images[lo:hi], labels)
    assert shards.resume_plan(out, manifest, 14, 10) == [0, 1]
    shards.write_shard(out, np.arange(7, 10), images[7:10], labels)
    assert shards.resume_plan(out, manifest, 14, 10) == [1]
    with pytest.raises(ValueError, match=r"lacks 2 of the 14 samples \(ids 12\.\.13\)"):
        shards.merge(out)
    shards.write_shard(out, np.arange(12, 14), images[12:14], labels)
    assert shards.resume_plan(out, manifest, 14, 10) == []
    res = shards.merge(out, grid_max=0)
    with np.load(res["npz"]) as z:
        np.testing.assert_array_equal(z["arr_0"], images)
        np.testing.assert_array_equal(z["arr_1"], labels)
    assert sorted(os.listdir(out)) == ["samples.npz"] and shards.recorded_settings(res["npz"]) == manifest
    assert shards.resume_plan(out, manifest, 14, 10) is None  # complete: nothing to redo
