"""Samplers: parity with openai/guided-diffusion, and exactness on a mixture of Gaussians."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _gmm import COVS, GMM, MEANS, K

from jaxdiff.diffusion import guides
from jaxdiff.diffusion import samplers as S
from jaxdiff.diffusion.schedules import logsnr_timesteps, make_schedule

# --- parity with guided-diffusion on adm_tiny_a.npz --------------------------------------------

@pytest.fixture(scope="module")
def adm_fns(adm):
    """Jitted U-Net and classifier-gradient functions of the fixture's networks.

    The parity runs use `sample_loop(..., loop="python")`: the same step function as the scan, but
    eager, so the two network compilations are shared by all samplers and respacings (the
    `lax.scan` path itself is exercised by the other tests).
    """
    from _adm import CLASSIFIER_FLAGS, UNET_FLAGS, state_dict

    from jaxdiff.convert import guided_diffusion as convert

    um, up = convert.from_guided_diffusion(state_dict(adm, "unet"), "unet", **UNET_FLAGS)
    cm, cp = convert.from_guided_diffusion(state_dict(adm, "classifier"), "classifier", **CLASSIFIER_FLAGS)
    apply = jax.jit(lambda p, x, t, cond: guides.unet_fn(um, p)(x, t, cond))
    grad = jax.jit(lambda p, x, t, cond: guides.classifier_guide(guides.logits_fn(cm, p))(x, t, cond))
    model_fn = lambda x, t, cond: apply(up, x, t, cond)
    cond_fn = lambda x, t, cond: grad(cp, x, t, cond)
    return model_fn, cond_fn


def test_classifier_gradient_matches_guided_diffusion(adm, adm_fns):
    from _adm import nchw, nhwc, rel_err

    _, cond_fn = adm_fns
    cond = guides.make_cond(4, adm["y"], classifier_scale=adm["classifier_scale"])
    g = nchw(cond_fn(nhwc(adm["x"]), jnp.asarray(adm["t"], jnp.int32), cond))
    ref = adm["cond_grad"]
    assert rel_err(g, ref) < 1e-4
    np.testing.assert_allclose(g, ref, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("name", ["ddim_plain", "ddim_guided", "ancestral_guided"])
@pytest.mark.parametrize("R", ["ddim10", "10"])
def test_parity_with_guided_diffusion(adm, adm_fns, R, name):
    from _adm import nchw, nhwc, rel_err

    model_fn, cond_fn = adm_fns
    cond = guides.make_cond(4, adm["y"], classifier_scale=adm["classifier_scale"])
    sched = make_schedule("cosine", 1000, R)  # the fixture's diffusion: cosine, 1000 steps
    np.testing.assert_array_equal(np.asarray(sched.timestep_map), adm[f"{R}/timestep_map"])
    np.testing.assert_allclose(np.asarray(sched.betas), adm[f"{R}/betas"], rtol=1e-6)
    ancestral = name.startswith("ancestral")
    out = S.sample_loop(model_fn, sched, nhwc(adm["x_T"]), cond, sampler="ddpm" if ancestral else "ddim",
                        noises=nhwc(adm[f"{R}/ancestral_noises"]) if ancestral else None,
                        cond_fn=None if name == "ddim_plain" else cond_fn,
                        learned_sigma=True, clip_denoised=True, loop="python")
    ref = adm[f"{R}/{name}"]
    # Relative L2 error. (Elementwise, "10"/ddim_guided differs by up to 7e-3 in a few pixels:
    # at t = 999 the guided x0 = x/sqrt(abar) - sqrt(1/abar - 1) eps amplifies the float32
    # rounding of the classifier gradient by sqrt(1/abar - 1) ~ 2e4, in PyTorch as here.)
    err = rel_err(nchw(out), ref)
    assert err <= 1e-3, (R, name, err)


# --- exactness on a 2-D mixture of Gaussians ---------------------------------------------------

@pytest.fixture(scope="module")
def gmm():
    return GMM()


def _class_moments_ok(x, n, what):
    """Each class block of n samples has the class mean and covariance within sampling error."""
    for k in range(K):
        xs = np.asarray(x[k * n:(k + 1) * n], np.float64)
        S_ = COVS[k]
        se_mean = np.sqrt(np.diag(S_) / n)
        assert np.all(np.abs(xs.mean(0) - MEANS[k]) < 5 * se_mean), (what, k, xs.mean(0), MEANS[k])
        # standard error of a sample covariance entry: sqrt((S_ii S_jj + S_ij^2) / n)
        se_cov = np.sqrt((np.outer(np.diag(S_), np.diag(S_)) + S_ ** 2) / n)
        err = np.cov(xs.T) - S_
        assert np.all(np.abs(err) < 5 * se_cov), (what, k, err, se_cov)


@pytest.mark.parametrize("sampler,respacing,fixed_variance", [
    ("ddpm", None, "large"),          # 1000 ancestral steps
    ("dpmpp2m", "logsnr20", "large"),  # 20 DPM-Solver++(2M) steps, uniform in log SNR
])
def test_exact_conditional_score_reproduces_each_class(gmm, sampler, respacing, fixed_variance):
    n = 2000
    y = np.repeat(np.arange(K), n)
    ids = np.arange(K * n)
    sched = make_schedule("cosine", 1000, respacing)
    run = jax.jit(lambda cond, key, ids: S.sample_loop(
        gmm.model_fn, sched, None, cond, sampler=sampler, key=key, sample_ids=ids, shape=(2,),
        clip_denoised=False, fixed_variance=fixed_variance))
    x = run(guides.make_cond(len(y), y), jax.random.key(0), ids)
    _class_moments_ok(x, n, sampler)


def test_dpmpp_2m_matches_reference_formulation(gmm):
    """DPM-Solver++(2M) in VP form == k-diffusion's sample_dpmpp_2m in the sigma (VE) form."""
    sched = make_schedule("cosine", 1000, "logsnr12")
    b = 64
    x_T = jax.random.normal(jax.random.key(3), (b, 2))
    y = jnp.arange(b) % K
    ours = jax.jit(lambda x: S.sample_loop(gmm.model_fn, sched, x, {"y": y}, sampler="dpmpp2m",
                                           clip_denoised=False))(x_T)
    # reference (float64 numpy except the model call)
    ac = np.asarray(sched.alphas_cumprod, np.float64)
    sig = np.sqrt((1 - ac) / ac)[::-1]                  # descending
    sigmas = np.append(sig, 0.0)
    tmap = np.asarray(sched.timestep_map)[::-1]
    eps_fn = jax.jit(gmm.eps)

    def denoised(x_ve, k):                               # x0 prediction at sigma_k
        a = 1.0 / np.sqrt(1.0 + sigmas[k] ** 2)
        x_vp = x_ve * a
        e = np.asarray(eps_fn(jnp.asarray(x_vp, jnp.float32), jnp.full((b,), tmap[k]), y), np.float64)
        return (x_vp - np.sqrt(1 - a * a) * e) / a

    x = np.asarray(x_T, np.float64) * np.sqrt(1.0 + sigmas[0] ** 2)
    old = None
    for k in range(len(sigmas) - 1):
        d = denoised(x, k)
        t, t_next = -np.log(sigmas[k]), (-np.log(sigmas[k + 1]) if sigmas[k + 1] > 0 else np.inf)
        h = t_next - t
        if old is None or sigmas[k + 1] == 0:
            x = (sigmas[k + 1] / sigmas[k]) * x - np.expm1(-h) * d
        else:
            r = (t - (-np.log(sigmas[k - 1]))) / h
            dd = (1 + 1 / (2 * r)) * d - (1 / (2 * r)) * old
            x = (sigmas[k + 1] / sigmas[k]) * x - np.expm1(-h) * dd
        old = d
    np.testing.assert_allclose(np.asarray(ours), x, atol=1e-4, rtol=1e-4)


def test_ddim_eta_one_is_ddpm_with_posterior_variance(gmm):
    sched = make_schedule("linear", 1000, "25")
    ids = np.arange(40)
    cond = guides.make_cond(40, ids % K)
    ddim = jax.jit(lambda c, k, i: S.sample_loop(gmm.model_fn, sched, None, c, sampler="ddim", eta=1.0, key=k,
                                                 sample_ids=i, shape=(2,), clip_denoised=False))
    ddpm = jax.jit(lambda c, k, i: S.sample_loop(gmm.model_fn, sched, None, c, sampler="ddpm", key=k,
                                                 sample_ids=i, shape=(2,), clip_denoised=False,
                                                 fixed_variance="small"))
    a, b = ddim(cond, jax.random.key(5), ids), ddpm(cond, jax.random.key(5), ids)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-4)


def test_noise_depends_on_sample_id_not_batch(gmm):
    sched = make_schedule("cosine", 1000, "8")
    run = jax.jit(lambda c, k, i: S.sample_loop(gmm.model_fn, sched, None, c, sampler="ddpm", key=k, sample_ids=i,
                                                shape=(2,), clip_denoised=False))
    ids = np.arange(10)
    full = np.asarray(run(guides.make_cond(10, ids % K), jax.random.key(7), ids))
    part_ids = np.array([7, 2, 9])
    part = np.asarray(run(guides.make_cond(3, part_ids % K), jax.random.key(7), part_ids))
    np.testing.assert_allclose(part, full[part_ids], atol=1e-6)  # x_T and every step's noise per sample id


def test_progress_bar_counts_every_step(gmm):
    sched = make_schedule("cosine", 1000, "6")
    run = jax.jit(lambda c, k, i: S.sample_loop(gmm.model_fn, sched, None, c, sampler="ddim", key=k, sample_ids=i,
                                                shape=(2,), progress=True))
    ids = np.arange(4)
    with S.progress_bar(2 * sched.num_steps, disable=False) as advance:
        from jaxdiff.diffusion.samplers import _Progress
        for _ in range(2):
            jax.block_until_ready(run(guides.make_cond(4, ids % K), jax.random.key(0), ids))
            jax.effects_barrier()
            advance(sched.num_steps)
        assert _Progress.bar.n == 2 * sched.num_steps
    jax.block_until_ready(run(guides.make_cond(4, ids % K), jax.random.key(0), ids))  # no active bar: no-op


def test_bad_sampler_arguments(gmm):
    sched = make_schedule("cosine", 1000, "4")
    x = jnp.zeros((2, 2))
    with pytest.raises(ValueError, match="unknown sampler 'euler'"):
        S.sample_loop(gmm.model_fn, sched, x, {}, sampler="euler")
    with pytest.raises(ValueError, match="needs `key` and `sample_ids`"):
        S.sample_loop(gmm.model_fn, sched, x, {}, sampler="ddpm")
    with pytest.raises(ValueError, match="noises must have shape"):
        S.sample_loop(gmm.model_fn, sched, x, {}, sampler="ddpm", noises=jnp.zeros((3, 2, 2)))
    with pytest.raises(ValueError, match="logSNR spacing asks for 1001 steps"):
        make_schedule("cosine", 1000, "logsnr1001")
    ts = logsnr_timesteps(np.asarray(make_schedule("cosine", 1000).alphas_cumprod), 20)
    assert len(ts) == 20 and ts[0] == 0 and ts[-1] == 999 and ts == sorted(set(ts))
