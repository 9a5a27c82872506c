"""Pod training (issue 16): FSDP meshes, sharded checkpoints on other meshes, gradient
accumulation, SIGTERM, multi-host consistency, metrics / TensorBoard / profiler, the data stream.

Multi-process runs are few and each checks several things: one uninterrupted 2-process x 4-device
fsdp=8 run (reference comparison, logs, memory report, the checkpoint the 8-device run restores),
its SIGTERM-interrupted twin and that twin's rerun, one 8-device process (tests/_pod_worker.py),
a 2-process run given two workdirs, and a 2-process x 3-device training grid.
"""

import json
import signal
import struct
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

try:
    import _training_helpers as H
except ImportError:  # tests/ imported as a package
    from tests import _training_helpers as H

WORKER = H.REPO / "tests" / "_pod_worker.py"
FSDP = ["--config.mesh.fsdp=8", "--config.mesh.min_shard_size=64", "--config.train.checkpoint_every=5"]


@pytest.fixture(scope="module")
def sess(tmp_path_factory):
    return H.session(tmp_path_factory)


def _start_two(cmd_of, environ, logs):
    """Start processes 0 and 1 (`cmd_of(i, port)`), output to logs[i]; returns the Popens."""
    port = H.free_port()
    procs = []
    for i in range(2):
        with open(logs[i], "w") as f:
            procs.append(subprocess.Popen(cmd_of(i, port), env=environ, stdout=f, stderr=subprocess.STDOUT))
    return procs


def _wait(procs, logs, timeout=300):
    try:
        for p in procs:
            p.wait(timeout=timeout)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [p.returncode for p in procs], [open(f).read() for f in logs]


def _two_process_train(work, data_dir, environ, tmp, *overrides, workdirs=None):
    def cmd(i, port):
        w = work if workdirs is None else workdirs[i]
        return H.train_cmd(w, data_dir, *overrides) + [
            f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}"]

    logs = [tmp / f"p{i}.log" for i in range(2)]
    return _start_two(cmd, environ, logs), logs


def _network_outputs(workdir, step):
    """The U-Net's outputs on a fixed batch with the raw and the EMA parameters of `step`."""
    from jaxdiff import checkpoints

    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 8, 8, 1)).astype(np.float32)
    t, y = np.arange(32) * 3, np.arange(32) % 11
    out = []
    for ema in (False, True):
        module, params, _ = checkpoints.load_model(str(workdir), step=step, ema=ema)
        out.append(np.asarray(module.apply({"params": params}, x, t, y)))
    return out


def _matches_reference(work, ref, step=H.STEPS):
    """Losses and network outputs within 1e-5 (relative) of the 1-device run; returns the figures.

    Raw parameter vectors are not compared entry by entry: the tiny U-Net's conv biases that feed a
    GroupNorm with one channel per group (and the key biases of attention) do not change the
    network's function, their gradient is float32 rounding noise that Adam normalises into
    lr-sized steps, so they drift apart between any two reduction orders (plain 8-device data
    parallelism included: relative L2 ~4e-5 after 30 steps); the network's outputs agree to ~3e-7.
    """
    got, want = H.losses(work), H.losses(ref)
    steps = [s for s in want if s <= step]
    assert steps and all(s in got for s in steps)
    loss_rel = max(abs(got[s] - want[s]) / abs(want[s]) for s in steps)
    out_rel = [float(np.linalg.norm(a - b) / np.linalg.norm(b))
               for a, b in zip(_network_outputs(work, step), _network_outputs(ref, step))]
    la = jax.tree_util.tree_leaves(H.load_tree(work, step)["params"])
    lb = jax.tree_util.tree_leaves(H.load_tree(ref, step)["params"])
    param_rel = float(np.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(la, lb)) / sum(np.sum(b ** 2) for b in lb)))
    assert loss_rel < 1e-5, loss_rel
    assert max(out_rel) < 1e-5, out_rel
    assert param_rel < 1e-3, param_rel
    return {"loss": loss_rel, "outputs": out_rel, "params_l2": param_rel}


def _event_tags(directory):
    """Scalar tags in the TensorBoard event files under `directory` (TFRecord framing, parsed here)."""
    from tensorboardX.proto import event_pb2

    tags = set()
    for path in directory.glob("events.out.tfevents.*"):
        data = path.read_bytes()
        pos = 0
        while pos + 12 <= len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
            tags.update(v.tag for v in event.summary.value)
            pos += 12 + n + 4
    return tags


@pytest.fixture(scope="module")
def fsdp_run(sess, tmp_path_factory):
    """The uninterrupted 2-process x 4-device fsdp=8 run (profiler window on steps 3..5)."""
    tmp = tmp_path_factory.mktemp("fsdp2x4")
    work = tmp / "w"
    procs, logs = _two_process_train(work, sess["data_dir"], H.env(sess["cache"], devices=4), tmp, *FSDP,
                                     "--config.profile_steps=(3, 5)")
    codes, outs = _wait(procs, logs)
    assert codes == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    return work


def test_two_processes_fsdp8_match_one_device_and_report(fsdp_run, sess):
    work = fsdp_run
    assert H.complete_steps(work)[-3:] == [20, 25, 30]
    print("fsdp=8 on 2 processes x 4 devices vs 1 device:", _matches_reference(work, sess["ref"]))
    mem = json.loads((work / "memory.json").read_text())
    assert mem["mesh"] == {"data": 1, "fsdp": 8} and mem["devices"] == 8
    assert mem["state_bytes_per_device"] <= mem["state_bytes"] / 8 * 1.05, mem
    assert mem["train_step"]["temp"] > 0 and mem["train_step"]["argument"] > 0
    lines = H.read_metrics(work)
    for key in ("images_per_sec_per_device", "step_time", "loss", "grad_norm"):
        assert all(key in m and np.isfinite(m[key]) for m in lines), key
    assert {"loss", "images_per_sec_per_device", "step_time"} <= _event_tags(work / "tensorboard")
    assert list((work / "profile").rglob("*.xplane.pb"))
    from jaxdiff import checkpoints  # the data stream position a resumed run continues from

    manager = checkpoints.make_manager(str(work / "checkpoints"), read_only=True)
    assert checkpoints.step_metadata(manager, 30) == {"data_position": 30 * 16, "batch_size": 16}
    manager.close()


def test_sigterm_to_one_process_saves_one_step_and_rerun_is_bitwise(fsdp_run, sess, tmp_path):
    """Resume the fsdp run's checkpoint 25 in a new workdir, SIGTERM process 1 as soon as it has
    resumed: both processes save one agreed step and exit 0; the rerun ends bitwise equal to the
    uninterrupted run."""
    import shutil

    work = tmp_path / "w"
    shutil.copytree(fsdp_run / "checkpoints", work / "checkpoints", ignore=lambda d, names: ["30"])
    environ = H.env(sess["cache"], devices=4, JAXDIFF_TEST_STEP_DELAY=0.25)
    procs, logs = _two_process_train(work, sess["data_dir"], environ, tmp_path, *FSDP)
    deadline = time.time() + 240
    while "resumed from the checkpoint of step 25" not in logs[1].read_text() and time.time() < deadline \
            and all(p.poll() is None for p in procs):
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)
    codes, outs = _wait(procs, logs)
    assert codes == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    stops = [[int(w.split()[0]) for w in out.split("stopped at step ")[1:]] for out in outs]
    assert len(stops[0]) == 1 and stops[0] == stops[1], stops
    stopped = stops[0][0]
    assert 25 < stopped < H.STEPS and H.complete_steps(work)[-2:] == [25, stopped]
    procs, logs = _two_process_train(work, sess["data_dir"], H.env(sess["cache"], devices=4), tmp_path, *FSDP)
    codes, outs = _wait(procs, logs)
    assert codes == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert f"resumed from the checkpoint of step {stopped}" in outs[0]
    H.assert_trees_equal(H.load_tree(work, H.STEPS), H.load_tree(fsdp_run, H.STEPS))


def test_eight_devices_layouts_accumulation_and_restore_elsewhere(fsdp_run, sess, tmp_path):
    """Two 8-device processes side by side (the machine has 2 cores): layouts + restore, and
    accumulation; the latter at LLVM's default level, not the suite's -O0, under which XLA's CPU
    backend runs convolution gradients inside the accumulation loop ~15x slower."""
    out = tmp_path / "res.json"
    optimised = H.env(sess["cache"], devices=8)
    optimised["XLA_FLAGS"] = optimised["XLA_FLAGS"].replace("--xla_backend_optimization_level=0", "")
    logs = [tmp_path / "eight.log", tmp_path / "accumulation.log"]
    procs = []
    for args, environ, log in (
            (["eight", str(sess["data_dir"]), str(tmp_path), str(fsdp_run), str(out)], H.env(sess["cache"], devices=8),
             logs[0]),
            (["accumulation", str(sess["data_dir"]), str(tmp_path)], optimised, logs[1])):
        with open(log, "w") as f:
            procs.append(subprocess.Popen([sys.executable, str(WORKER), *args], env=environ, stdout=f,
                                          stderr=subprocess.STDOUT))
    codes, outs = _wait(procs, logs)
    assert codes == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    res = json.loads(out.read_text())
    # data=2 x fsdp=4 (with remat): a quarter of the state per device, small arrays replicated
    lay = res["data2_fsdp4"]
    assert lay["devices"] == 8 and lay["max_fraction"] <= 0.25 * 1.05 and 0 < lay["replicated_leaves"] < lay["leaves"]
    print("data=2 x fsdp=4 vs 1 device:", lay, _matches_reference(tmp_path / "data2_fsdp4", sess["ref"]))
    # accumulation: k=4 micro-batches of 8 vs one batch of 32, 10 steps
    k1, k4 = tmp_path / "k1", tmp_path / "k4"
    l1, l4 = H.losses(k1), H.losses(k4)
    assert sorted(l1) == sorted(l4) == [5, 10]
    loss_rel = max(abs(l4[s] - l1[s]) / abs(l1[s]) for s in l1)
    a, b = H.load_tree(k4, 10), H.load_tree(k1, 10)
    la, lb = jax.tree_util.tree_leaves(a["params"]), jax.tree_util.tree_leaves(b["params"])
    param_rel = float(np.sqrt(sum(np.sum((x - y) ** 2) for x, y in zip(la, lb)) / sum(np.sum(y ** 2) for y in lb)))
    temp = {k: json.loads((tmp_path / f"k{k}" / "memory.json").read_text())["train_step"]["temp"] for k in (1, 4)}
    print(f"accumulation k=4 vs k=1: loss rel {loss_rel:.2e}, params rel L2 {param_rel:.2e}, temp bytes {temp}")
    assert loss_rel < 1e-6 and param_rel < 1e-5
    assert temp[4] < temp[1]
    # the 2-process checkpoint on other meshes
    for name, devices in (("fsdp8", 8), ("data8", 8), ("one_device", 1)):
        assert res["restore"][name]["bitwise"] and res["restore"][name]["devices"] == devices, res["restore"]
    assert res["restore"]["fsdp8"]["spec"] != res["restore"]["data8"]["spec"]


def test_processes_refuse_different_workdirs_and_grid_on_two_by_three(sess, tmp_path):
    t0 = time.time()
    procs, logs = _two_process_train(None, sess["data_dir"], H.env(sess["cache"], devices=4), tmp_path,
                                     workdirs=[tmp_path / "a", tmp_path / "b"])
    codes, outs = _wait(procs, logs, timeout=60)
    assert time.time() - t0 < 60 and codes == [1, 1], outs
    for out in outs:
        assert "train.py: error: process(es) 1 cannot read the run files process 0 wrote" in out
        assert "Every process must be given the same workdir" in out and "Traceback" not in out
    assert not (tmp_path / "b").exists()
    # the training grid: 10 classes x 2 = 20 images on 2 processes x 3 devices
    procs = _start_two(lambda i, port: [sys.executable, str(WORKER), "grid", str(sess["data_dir"]), str(tmp_path),
                                        str(port), "2", str(i)],
                       H.env(sess["cache"], devices=3), [tmp_path / f"g{i}.log" for i in range(2)])
    codes, outs = _wait(procs, [tmp_path / f"g{i}.log" for i in range(2)])
    assert codes == [0, 0], outs
    with np.load(tmp_path / "grid.npz") as f:
        assert f["images"].shape == (20, 8, 8, 1) and f["images"].dtype == np.uint8
        np.testing.assert_array_equal(f["labels"], np.repeat(np.arange(10), 2))


# --- in-process checks ---------------------------------------------------------------------------

def _tiny(data_dir=None):
    import importlib.util

    spec = importlib.util.spec_from_file_location("tiny_config", H.TINY)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = mod.get_config()
    if data_dir is not None:
        cfg.data.data_dir = str(data_dir)
    return cfg


@pytest.mark.parametrize("mutate,message", [
    (lambda c: c.mesh.update(fsdp=3), r"config.mesh.fsdp=3 does not divide the 8 devices; allowed: 1, 2, 4, 8"),
    (lambda c: c.mesh.update(data=3, fsdp=2),
     r"config.mesh.data=3 x config.mesh.fsdp=2 = 6 devices, but there are 8"),
    (lambda c: c.train.update(grad_accum_steps=4),
     r"grad_accum_steps=4 does not divide config.train.batch_size=16 into micro-batches the 8 devices can share"),
    (lambda c: c.train.update(grad_accum_steps=0), r"grad_accum_steps=0: expected a positive integer"),
    (lambda c: c.data.update(workers=0), r"config.data.workers=0: expected a positive integer"),
    (lambda c: setattr(c, "profile_steps", (5, 2)), r"config.profile_steps=\(5, 2\): expected \(\) \(no trace\)"),
])
def test_bad_mesh_and_accumulation_refused_before_compiling(mutate, message, monkeypatch):
    from jaxdiff.train import config as train_config

    monkeypatch.setattr(jax, "device_count", lambda *a: 8)
    cfg = _tiny()
    mutate(cfg)
    with pytest.raises(train_config.ConfigError, match=message):
        train_config.validate_config(cfg)


def test_fsdp_rule_and_mesh():
    from jax.sharding import PartitionSpec as P

    from jaxdiff import parallel

    assert parallel.fsdp_spec((3, 3, 64, 128), 8, 0) == P(None, None, None, "fsdp")  # largest divisible
    assert parallel.fsdp_spec((3, 3, 64, 64), 8, 0) == P(None, None, None, "fsdp")   # last of equal ones
    assert parallel.fsdp_spec((30, 12), 8, 0) == P()                                 # none divisible
    assert parallel.fsdp_spec((64,), 8, 65) == P() and parallel.fsdp_spec((64,), 1, 0) == P()
    assert parallel.mesh_shape(-1, 4, 8) == (2, 4)
    # the layout bench_pod_memory.py reports: on a 1 x 8 abstract mesh, a (64, 128) float32 kernel
    # keeps 1/8 of its bytes per device and a small bias stays whole
    from jax.sharding import AbstractMesh, AxisType

    abstract = AbstractMesh((1, 8), parallel.MESH_AXES, axis_types=(AxisType.Auto,) * 2)
    tree = {"kernel": jax.ShapeDtypeStruct((64, 128), np.float32), "bias": jax.ShapeDtypeStruct((128,), np.float32)}
    shardings = parallel.state_shardings(tree, abstract, min_size=1024)
    assert shardings["kernel"].spec == P(None, "fsdp") and shardings["bias"].spec == P()
    assert parallel.bytes_per_device(tree, shardings) == 64 * 128 * 4 // 8 + 128 * 4
    mesh = parallel.make_mesh()
    assert mesh.axis_names == ("data", "fsdp") and mesh.devices.size == jax.device_count()
    assert parallel.batch_sharding(mesh).spec == P(("data", "fsdp"))
    assert parallel.batch_sharding(parallel.data_mesh()).spec == P("data")  # sampling: unchanged
    from jaxdiff import checkpoints

    assert str(checkpoints.as_path("gs://bucket/run")) == "gs://bucket/run"  # never os.path.abspath'd


def test_per_example_keys_make_micro_batches_equal_one_batch():
    """The loss of a batch is the mean of its halves' losses when each half passes its rows' ids,
    with label dropout, random t and noise (a stub network; the 8-device run checks the real one)."""
    import jax.numpy as jnp

    from jaxdiff.data.sources import DataInfo
    from jaxdiff.diffusion import schedules
    from jaxdiff.train import config as train_config
    from jaxdiff.train import losses

    class Stub:
        def apply(self, variables, x, t, y=None, train=False, rngs=None):
            return x * variables["params"]["w"] + t[:, None, None, None] / 100.0

    info = DataInfo(name="digits", split="train", num_examples=1438, image_shape=(8, 8, 1), num_classes=10,
                    class_names=tuple(map(str, range(10))), random_flip=False, resize_mode="resize",
                    pad_value=0, data_dir="/unused")
    r = train_config.resolve_config(_tiny(), info)
    r.diffusion.update(p_uncond=0.5, learned_sigma=False)
    loss_fn = jax.jit(losses.diffusion_loss_fn(r, Stub(), schedules.make_schedule("cosine", 100)))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 8, 8, 1)).astype(np.float32)  # numpy: slicing compiles nothing
    y = np.arange(16, dtype=np.int32) % 10
    ids = np.arange(16, dtype=np.int32)
    key = jax.random.key(3)
    p = {"w": jnp.float32(0.5)}
    whole = float(loss_fn(p, x, y, key, ids)[0])  # ids default to 0..b-1
    halves = [float(loss_fn(p, x[s], y[s], key, ids[s])[0]) for s in (slice(0, 8), slice(8, 16))]
    np.testing.assert_allclose(whole, np.mean(halves), rtol=1e-6)
    shuffled = np.random.default_rng(1).permutation(16)
    np.testing.assert_allclose(float(loss_fn(p, x[shuffled], y[shuffled], key, ids[shuffled])[0]), whole, rtol=1e-6)
    assert abs(float(loss_fn(p, x, y, jax.random.key(4), ids)[0]) - whole) > 1e-4  # keys matter


def test_stop_request_single_process_and_handlers_restored():
    from jaxdiff.train import preemption

    before = signal.getsignal(signal.SIGTERM)
    with preemption.StopRequest() as stop:
        assert not stop.reached(1)
        signal.raise_signal(signal.SIGTERM)
        assert stop.reached(2)
    assert signal.getsignal(signal.SIGTERM) is before


def test_data_workers_byte_identical_and_stream_independent_of_batch_size(tmp_path):
    import tensorflow_datasets as tfds

    from jaxdiff.data import batching
    from jaxdiff.data import order as data_order
    from jaxdiff.data import sources as data_sources
    from jaxdiff.data.datasets._common import ImageArraysBuilder

    class Rgb64(ImageArraysBuilder, skip_registration=True):
        """Random 64x64 RGB PNGs in array_record: the decoding path of a prepared tfds dataset."""

        name = "rgb64"
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(64, 64, 3)),
                "label": tfds.features.ClassLabel(num_classes=4)}), supervised_keys=("image", "label"))

        def _split_arrays(self, dl_manager):
            rng = np.random.default_rng(0)
            return {"train": (rng.integers(0, 256, (40, 64, 64, 3), dtype=np.uint8), np.arange(40) % 4)}

    Rgb64(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    source, _ = data_sources.make_source("rgb64", "train", str(tmp_path))
    assert not source.in_memory
    kw = dict(global_batch_size=12, seed=3, augment=True, image_size=32, num_steps=4)
    for p, count in ((0, 1), (1, 2), (2, 3)):
        one = list(batching.batches(source, start_step=5, process_index=p, process_count=count, workers=1, **kw))
        many = list(batching.batches(source, start_step=5, process_index=p, process_count=count, workers=3, prefetch=0,
                                 **kw))
        for (x1, y1), (x3, y3) in zip(one, many):
            assert x1.tobytes() == x3.tobytes() and y1.tobytes() == y3.tobytes()
    # one stream of examples: batches of 12 from position 36 are two batches of 6 from there
    big = list(batching.batches(source, global_batch_size=12, seed=3, augment=True, start_step=3, start_position=36,
                            num_steps=2, process_index=0, process_count=1))
    small = list(batching.batches(source, global_batch_size=6, seed=3, augment=True, start_step=7, start_position=36,
                              num_steps=4, process_index=0, process_count=1))
    np.testing.assert_array_equal(np.concatenate([x for x, _ in big]), np.concatenate([x for x, _ in small]))
    flips = data_order.position_flips(np.arange(36, 60), 3)
    assert 0 < flips.sum() < 24


def test_grid_classes_and_throughput():
    from jaxdiff.train import grids, monitor

    np.testing.assert_array_equal(grids.grid_classes(10, 16), np.arange(10))
    g = grids.grid_classes(1000, 16)
    assert len(g) == 16 and g[0] == 0 and g[-1] == 999
    t = monitor.throughput(10, 2.0, 64)
    assert t["step_time"] == 0.2 and t["images_per_sec"] == 320.0
    assert t["images_per_sec_per_device"] == 320.0 / jax.device_count()
    assert monitor.device_memory() == {} or "memory_bytes_in_use" in monitor.device_memory()


def test_disagreeing_processes_refused_on_every_process(monkeypatch, tmp_path):
    """The collective checks' error paths, with the other process simulated: a different latest
    checkpoint, a different config (what process 1 would see; every process raises the same)."""
    from jaxdiff import checkpoints, parallel
    from jaxdiff.train import config as train_config
    from jaxdiff.train import loop as training

    class Manager:
        directory = "W/checkpoints"

        def latest_step(self):
            return 20

    monkeypatch.setattr(parallel, "process_values", lambda v: np.stack([np.asarray(v), np.full_like(v, -1)]))
    with pytest.raises(train_config.ConfigError, match=r"different latest checkpoints .*process 0: step 20; "
                                                   r"process 1: none"):
        training.agree_on_start(Manager())
    work = checkpoints.as_path(tmp_path)
    (tmp_path / "config.json").write_text("{}\n")
    (tmp_path / training.HOSTS_FILE).write_text("7\n")
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    answers = iter([lambda v: np.array([7, int(v)]),   # the token: process 0 drew 7
                    lambda v: np.array([0, int(v)])])  # the codes: process 0's, then this process's
    monkeypatch.setattr(parallel, "process_values", lambda v: next(answers)(v))
    monkeypatch.setattr(parallel, "process_strings", lambda s: [s, s])
    with pytest.raises(train_config.ConfigError, match=r"process\(es\) 1 resolved a different config than process 0"):
        training.prepare_workdir(work, '{"other": 1}\n')


def test_pod_config_resolves_on_a_slice(monkeypatch):
    """configs/imagenet64_pod.py on 32 devices: ADM ImageNet-64's network (295.9 M parameters)."""
    import importlib.util

    from jaxdiff.data.sources import DataInfo
    from jaxdiff.train import config as train_config
    from jaxdiff.train import state as train_state

    monkeypatch.setattr(jax, "device_count", lambda *a: 32)
    spec = importlib.util.spec_from_file_location("pod_config", H.REPO / "configs" / "imagenet64_pod.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    info = DataInfo(name="imagenet_resized/64x64", split="train", num_examples=1281167, image_shape=(64, 64, 3),
                    num_classes=1000, class_names=(), random_flip=True, resize_mode="center_crop", pad_value=0,
                    data_dir="/unused")
    r = train_config.resolve_config(mod.get_config(), info)
    assert r.model.use_checkpoint and r.model.out_channels == 6 and r.mesh.fsdp == 4
    shapes = jax.eval_shape(lambda k: train_state.init_state(r, train_config.create_model(r), train_state.make_optimizer(r.train),
                                                          k), jax.random.key(0))
    assert abs(sum(x.size for x in jax.tree_util.tree_leaves(shapes.params)) - 295.9e6) < 0.1e6
