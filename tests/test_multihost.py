"""Data parallelism: 8 fake CPU devices and 2 joined processes train like 1 device."""

import subprocess

import numpy as np
import pytest

try:
    import _training_helpers as H
except ImportError:  # tests/ imported as a package
    from tests import _training_helpers as H


@pytest.fixture(scope="module")
def sess(tmp_path_factory):
    return H.session(tmp_path_factory)


def _compare_to_reference(work, ref, loss_rtol=1e-5, param_rtol=1e-3):
    got, want = H.losses(work), H.losses(ref)
    assert sorted(got) == sorted(want) == list(range(5, H.STEPS + 1, 5))
    for step in want:
        np.testing.assert_allclose(got[step], want[step], rtol=loss_rtol, err_msg=f"loss at step {step}")
    a, b = H.load_tree(work, H.STEPS), H.load_tree(ref, H.STEPS)
    assert int(a["step"]) == int(b["step"]) == H.STEPS
    # Reduction order differs, and Adam turns tiny gradient differences of near-zero entries into
    # lr-sized steps, so parameters agree as a whole (relative L2), not entry by entry.
    import jax

    la, lb = jax.tree_util.tree_leaves(a["params"]), jax.tree_util.tree_leaves(b["params"])
    diff = np.sqrt(sum(np.sum((x - y) ** 2) for x, y in zip(la, lb)))
    norm = np.sqrt(sum(np.sum(y ** 2) for y in lb))
    assert diff / norm < param_rtol, (diff, norm)


def test_eight_devices_match_one_device(sess, tmp_path):
    work = tmp_path / "w8"
    probe = H.run([H.sys.executable, "-c", "import jax; print(jax.device_count())"],
                  H.env(sess["cache"], devices=8))
    assert probe.stdout.strip() == "8"
    H.run(H.train_cmd(work, sess["data_dir"]), H.env(sess["cache"], devices=8))
    _compare_to_reference(work, sess["ref"])


def test_batch_size_must_divide_over_devices(sess, tmp_path):
    p = H.run(H.train_cmd(tmp_path / "w", sess["data_dir"], "--config.train.batch_size=12"),
              H.env(sess["cache"], devices=8), check=False)
    assert p.returncode == 1
    assert "batch_size=12 cannot be shared by the 8 devices" in p.stderr
    assert "Traceback" not in p.stderr


def test_two_processes_train_together_and_checkpoint(sess, tmp_path):
    work = tmp_path / "w2p"
    port = H.free_port()
    procs = []
    for i in range(2):
        cmd = H.train_cmd(work, sess["data_dir"]) + [
            f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}"]
        procs.append(subprocess.Popen(cmd, env=H.env(sess["cache"]), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=300))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-5000:]
    assert H.complete_steps(work) == [10, 20, 30]
    _compare_to_reference(work, sess["ref"])
    from jaxdiff import checkpoints

    _, params, cfg = checkpoints.load_model(str(work))
    assert cfg["step"] == H.STEPS
