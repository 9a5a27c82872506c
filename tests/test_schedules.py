import numpy as np
import pytest

from jaxdiff.diffusion import schedules


def test_cosine_schedule_matches_guided_diffusion(adm):
    betas = schedules.named_betas("cosine", 1000)
    np.testing.assert_allclose(betas, adm["betas"], rtol=0, atol=1e-10)
    np.testing.assert_allclose(np.cumprod(1 - betas), adm["alphas_cumprod"], rtol=0, atol=1e-10)


@pytest.mark.parametrize("respacing", ["ddim10", "10"])
def test_respacing_matches_guided_diffusion(adm, respacing):
    betas = schedules.named_betas("cosine", 1000)
    new_betas, tmap = schedules.respace_betas(betas, schedules.space_timesteps(1000, respacing))
    np.testing.assert_array_equal(tmap, adm[f"{respacing}/timestep_map"])
    np.testing.assert_allclose(new_betas, adm[f"{respacing}/betas"], rtol=0, atol=1e-10)
    sched = schedules.make_schedule("cosine", 1000, respacing)
    np.testing.assert_array_equal(np.asarray(sched.timestep_map), tmap)
    assert sched.num_steps == 10 and sched.num_train_timesteps == 1000


def test_linear_schedule_endpoints_scale_with_length():
    b = schedules.named_betas("linear", 1000)
    assert b[0] == pytest.approx(1e-4) and b[-1] == pytest.approx(0.02)
    b = schedules.named_betas("linear", 4000)
    assert b[0] == pytest.approx(2.5e-5) and b[-1] == pytest.approx(0.005)


def test_space_timesteps_forms():
    assert schedules.space_timesteps(100, "10") == list(range(0, 100, 11))
    assert schedules.space_timesteps(1000, "ddim25") == list(range(0, 1000, 40))
    got = schedules.space_timesteps(300, "1,2,3")
    assert got == [0, 100, 199, 200, 250, 299]  # round-half-even, as guided-diffusion
    assert schedules.space_timesteps(50, "50") == list(range(50))


def test_respacing_keeps_alphas_cumprod():
    betas = schedules.named_betas("linear", 1000)
    keep = schedules.space_timesteps(1000, "ddim50")
    new_betas, tmap = schedules.respace_betas(betas, keep)
    np.testing.assert_allclose(np.cumprod(1 - new_betas), np.cumprod(1 - betas)[tmap], rtol=1e-12)


@pytest.mark.parametrize("bad, match", [
    ("1001", "only 1000"), ("ddim999", "integer stride"), ("ddimx", "ddimN"), ("a,b", "allowed forms"),
    ("0", "at least one step"),
])
def test_bad_respacing_is_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        schedules.space_timesteps(1000, bad)


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="unknown noise schedule 'cos'.*linear, cosine"):
        schedules.make_schedule("cos", 1000)
