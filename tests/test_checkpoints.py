"""Checkpoints: keep-last-N-and-best, exact resume after SIGKILL (at a random step, and inside a
checkpoint write), load_model for trained and converted checkpoints."""

import json
import os
import random
import signal
import subprocess
import time

import numpy as np
import pytest

try:
    import _training_helpers as H
except ImportError:  # tests/ imported as a package
    from tests import _training_helpers as H


@pytest.fixture(scope="module")
def sess(tmp_path_factory):
    return H.session(tmp_path_factory)


def test_manager_keeps_last_n_and_best(tmp_path):
    from typing import Any

    import flax
    import jax
    import jax.numpy as jnp
    import optax

    from jaxdiff import checkpoints

    @flax.struct.dataclass
    class S:
        step: Any
        params: Any
        opt_state: Any

    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    tx = optax.adamw(1e-3)
    state = S(jnp.array(0), params, tx.init(params))
    mgr = checkpoints.make_manager(str(tmp_path / "ck"), keep=2)
    for step, loss in [(1, 5.0), (2, 1.0), (3, 3.0), (4, float("nan")), (5, 4.0)]:
        state = state.replace(step=jnp.array(step), params=jax.tree.map(lambda x: x + 1, state.params))
        assert checkpoints.save(mgr, step, state, {"loss": loss})
    assert not checkpoints.save(mgr, 5, state, {"loss": 0.0})  # an existing step is not rewritten
    mgr.wait_until_finished()
    assert mgr.all_steps() == [2, 4, 5]  # last 2 and the best (lowest loss; NaN never best)
    assert mgr.best_step() == 2
    restored, step = checkpoints.restore_latest(mgr, jax.eval_shape(lambda: state))
    assert step == 5 and isinstance(restored, S)
    np.testing.assert_array_equal(restored.params["w"], np.full((3, 2), 6.0))
    mgr.close()
    empty = checkpoints.make_manager(str(tmp_path / "empty"), keep=1)
    assert checkpoints.restore_latest(empty, jax.eval_shape(lambda: state)) == (None, None)
    empty.close()
    with pytest.raises(ValueError, match="keep must be an integer >= 1"):
        checkpoints.make_manager(str(tmp_path / "x"), keep=0)


def _kill_at_random_step(cmd, environ, work, rng, after_checkpoint):
    """Start `cmd` (slowed to 0.25 s a step) and SIGKILL it at a random step after checkpoint
    `after_checkpoint` is complete; returns the last logged step before the kill."""
    proc = subprocess.Popen(cmd, env=environ, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    target = rng.randint(after_checkpoint + 1, H.STEPS - 3)
    deadline = time.time() + 240
    killed_at = None
    try:
        while time.time() < deadline and proc.poll() is None:
            steps = [m["step"] for m in H.read_metrics(work)]
            if steps and steps[-1] >= target - 5 and after_checkpoint in H.complete_steps(work):
                time.sleep(rng.uniform(0.0, 1.0))  # lands on a random step
                killed_at = steps[-1]
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.05)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert killed_at is not None, f"run ended before it could be killed: {proc.stderr.read()[-3000:]}"
    assert proc.returncode == -signal.SIGKILL
    return killed_at


def test_interrupted_runs_resume_exactly(sess, tmp_path):
    """One workdir, interrupted twice, then finished by rerunning the same command:

    1. SIGKILL inside the second checkpoint save (step 20: data written, orbax's commit rename
       pending): step 10 stays the latest complete checkpoint and loads;
    2. the rerun resumes from 10 and is SIGKILLed at a random step after it has written 20;
    3. the rerun finishes. The final state equals the uninterrupted reference run's bit for bit,
       and metrics.jsonl holds exactly the reference's lines (no duplicates from the killed runs).
    """
    from jaxdiff import checkpoints

    rng = random.Random(os.getpid() ^ int(time.time()))
    work = tmp_path / "w"
    mark = tmp_path / "killed_in"
    cmd = H.train_cmd(work, sess["data_dir"])
    # 1. kill during a checkpoint write
    p = H.run(cmd, H.env(sess["cache"], JAXDIFF_TEST_KILL_IN_SAVE=2, JAXDIFF_TEST_KILL_MARK=mark), check=False)
    assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
    assert mark.read_text() == "20"
    leftovers = [q.name for q in (work / "checkpoints").iterdir() if not q.name.isdigit()]
    assert any("tmp" in name for name in leftovers), leftovers  # the interrupted write
    assert H.complete_steps(work) == [10]
    _, params, cfg = checkpoints.load_model(str(work))  # the last complete one loads
    assert cfg["step"] == 10
    H.assert_trees_equal(params, H.load_tree(sess["ref"], 10)["ema_params"])
    # 2. resume, then SIGKILL at a random step after checkpoint 20
    killed_at = _kill_at_random_step(cmd, H.env(sess["cache"], JAXDIFF_TEST_STEP_DELAY=0.25), work, rng, 20)
    assert 20 <= killed_at < H.STEPS
    assert not [q for q in (work / "checkpoints").iterdir() if "tmp" in q.name]  # cleaned on resume
    assert max(H.complete_steps(work)) < H.STEPS
    # 3. the same command finishes the run
    H.run(cmd, H.env(sess["cache"]))
    assert H.complete_steps(work) == [10, 20, 30]
    H.assert_trees_equal(H.load_tree(work, H.STEPS), H.load_tree(sess["ref"], H.STEPS))
    from jaxdiff.train.monitor import TIMING_KEYS  # steps/s, step time, images/s, memory: machine, not model

    strip = lambda ms: [{k: v for k, v in m.items() if k not in TIMING_KEYS} for m in ms]
    assert strip(H.read_metrics(work)) == strip(H.read_metrics(sess["ref"]))


def test_load_model_trained_and_converted(sess, tmp_path):
    from jaxdiff import checkpoints
    from jaxdiff.convert import converted

    module, params, cfg = checkpoints.load_model(str(sess["ref"]))
    assert cfg["step"] == H.STEPS
    assert cfg["model"]["kind"] == "unet" and cfg["model"]["out_channels"] == 2
    assert cfg["model"]["num_classes"] == 10 and cfg["model"]["null_label"] is True
    assert {"schedule", "num_timesteps", "prediction", "learned_sigma"} <= set(cfg["diffusion"])
    ref = H.load_tree(sess["ref"], H.STEPS)
    H.assert_trees_equal(params, ref["ema_params"])
    assert not np.array_equal(ref["ema_params"]["out_2"]["kernel"], ref["params"]["out_2"]["kernel"])
    _, raw, _ = checkpoints.load_model(str(sess["ref"]), ema=False)
    H.assert_trees_equal(raw, ref["params"])
    # the module applies to the restored parameters
    import jax.numpy as jnp

    x = jnp.zeros((2, 8, 8, 1))
    out = module.apply({"params": params}, x, jnp.array([0, 50]), jnp.array([3, 10]))
    assert out.shape == (2, 8, 8, 2)

    flags = {k: v for k, v in cfg["model"].items() if k != "kind"}
    conv_dir = tmp_path / "converted"
    converted.save_converted(conv_dir, params, "unet", flags,
                           {"noise_schedule": "linear", "diffusion_steps": 1000, "learn_sigma": True,
                            "predict_xstart": False, "timestep_respacing": ""})
    m2, p2, c2 = checkpoints.load_model(str(conv_dir))
    assert c2["diffusion"]["schedule"] == "linear" and c2["diffusion"]["num_timesteps"] == 1000
    assert c2["diffusion"]["learned_sigma"] is True and c2["diffusion"]["prediction"] == "eps"
    assert c2["model"]["kind"] == "unet"
    H.assert_trees_equal(p2, params)
    cfg_json = json.loads((conv_dir / "config.json").read_text())
    cfg_json["diffusion"]["predict_xstart"] = True
    (conv_dir / "config.json").write_text(json.dumps(cfg_json))
    assert checkpoints.load_model(str(conv_dir))[2]["diffusion"]["prediction"] == "x0"
    with pytest.raises(FileNotFoundError, match="config.json"):
        checkpoints.load_model(str(tmp_path / "nothing"))


def test_checkpoint_of_another_model_is_refused(sess, tmp_path):
    import shutil

    work = tmp_path / "w"
    shutil.copytree(sess["ref"] / "checkpoints", work / "checkpoints")
    p = H.run(H.train_cmd(work, sess["data_dir"], "--config.model.num_res_blocks=2"), H.env(sess["cache"]),
              check=False)
    assert p.returncode == 1
    assert "does not fit this config's model/optimiser (was the workdir trained with another config?)" in p.stderr
    assert "Traceback" not in p.stderr
