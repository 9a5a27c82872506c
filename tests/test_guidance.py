"""Guides on a problem with a known answer (2-D mixture of Gaussians) and on the ADM fixture."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _gmm import GMM, NULL, K

from jaxdiff.diffusion import guidance, guides
from jaxdiff.diffusion import samplers as S
from jaxdiff.diffusion.schedules import make_schedule


@pytest.fixture(scope="module")
def gmm():
    return GMM()


def _points(n=64, seed=0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.normal(size=(n, 2)) * 0.8, jnp.float32)


def test_classifier_guidance_scale_one_gives_exact_conditional_score(gmm):
    sched = make_schedule("cosine", 1000)
    x = _points(96)
    b = x.shape[0]
    y = jnp.arange(b) % K
    i = jnp.asarray(np.repeat([10, 300, 700], b // 3))  # unrespaced: index == original timestep
    # per-sample scales: 1 for most samples, 0 for every fourth (must stay unconditional)
    s = jnp.where(jnp.arange(b) % 4 == 3, 0.0, 1.0)
    cond = {"y": y, guides.CLASSIFIER_SCALE: s}

    @jax.jit
    def check(x, i, cond):
        d = S.denoise(gmm.uncond_model_fn, sched, x, i, cond, x0_fn=None,
                      cond_fn=guides.classifier_guide(gmm.logits_fn))
        t = sched.timestep_map[i]
        want = jnp.where((cond[guides.CLASSIFIER_SCALE] == 1.0)[:, None], gmm.eps(x, t, y), gmm.eps(x, t, None))
        # the score itself: grad log p(y|x_t) added to the unconditional score
        g = guides.classifier_guide(gmm.logits_fn)(x, t, {"y": y, guides.CLASSIFIER_SCALE: jnp.ones(b)})
        return d.eps, want, gmm.uncond_score(x, t) + g, gmm.cond_score(x, t, y)

    eps, want, guided_score, cond_score = check(x, i, cond)
    np.testing.assert_allclose(np.asarray(eps), np.asarray(want), atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(guided_score), np.asarray(cond_score), atol=1e-4, rtol=1e-4)


def test_cfg_scales_one_batched_call(gmm):
    x = _points(32)
    b = x.shape[0]
    t = jnp.full((b,), 400)
    y = jnp.arange(b) % K
    seen = []

    def model_fn(x_, t_, cond):
        seen.append(x_.shape[0])
        return gmm.model_fn(x_, t_, cond)

    f = jax.jit(guides.classifier_free(model_fn, null_label=NULL))
    eps = jax.jit(gmm.eps)
    eps_c, eps_u = eps(x, t, y), eps(x, t, None)
    for s, want in [(1.0, eps_c), (0.0, eps_u), (3.0, eps_u + 3.0 * (eps_c - eps_u))]:
        out = f(x, t, {"y": y, guides.CFG_SCALE: jnp.full((b,), s)})
        np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=1e-6, rtol=1e-5)
    assert seen == [2 * b]  # traced once; conditional and unconditional from ONE call on [x, x]
    # per-sample scales
    s = jnp.arange(b) % 3 * 1.0
    out = f(x, t, {"y": y, guides.CFG_SCALE: s})
    np.testing.assert_allclose(np.asarray(out), np.asarray(eps_u + s[:, None] * (eps_c - eps_u)), atol=1e-6)


def test_cfg_learned_sigma_keeps_conditional_variance():
    def model_fn(x, t, cond):
        y = cond["y"].astype(jnp.float32)[:, None]
        return jnp.concatenate([x + y, x * 0 + 0.1 * y - 0.5], axis=-1)  # [eps | var values]

    x = _points(6)
    y = jnp.array([0, 1, 2, 0, 1, 2])
    out = guides.classifier_free(model_fn, null_label=5, learned_sigma=True)(
        x, jnp.zeros(6, jnp.int32), {"y": y, guides.CFG_SCALE: jnp.full((6,), 2.0)})
    yc = y.astype(jnp.float32)[:, None]
    np.testing.assert_allclose(out[:, :2], (x + 5.0) + 2.0 * (yc - 5.0), atol=1e-5)
    np.testing.assert_allclose(out[:, 2:], jnp.broadcast_to(0.1 * yc - 0.5, (6, 2)), atol=1e-6)


def test_cfg_without_null_label_is_a_clear_error(gmm):
    with pytest.raises(ValueError, match="null label"):
        guides.classifier_free(gmm.model_fn, null_label=None)
    with pytest.raises(ValueError, match="null label"):
        guidance.build_guides("cfg", gmm.model_fn, null_label=None)


def test_autoguidance_mixes_main_and_weak_model(gmm):
    x = _points(16)
    t = jnp.full((16,), 500)
    y = jnp.arange(16) % K
    weak = lambda x_, t_, c: 0.7 * gmm.model_fn(x_, t_, c)
    f = jax.jit(guides.autoguidance(gmm.model_fn, weak))
    main = jax.jit(gmm.model_fn)(x, t, {"y": y})
    for s, want in [(1.0, main), (0.0, 0.7 * main), (2.5, 0.7 * main + 2.5 * 0.3 * main)]:
        out = f(x, t, {"y": y, guides.AUTOGUIDANCE_SCALE: jnp.full((16,), s)})
        np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=1e-6, rtol=1e-5)


def test_log_density_guide_is_the_scaled_gradient():
    c = jnp.array([0.3, -0.2])
    log_density = lambda x, t, cond: -0.5 * jnp.sum((x - c) ** 2, axis=-1) / 0.25
    x = _points(8)
    s = jnp.linspace(0.0, 2.0, 8)
    g = guides.log_density_guide(log_density, scale_key="my_scale")(x, jnp.zeros(8, jnp.int32), {"my_scale": s})
    np.testing.assert_allclose(np.asarray(g), np.asarray(s[:, None] * (c - x) / 0.25), atol=1e-5)
    # sum of guides
    two = guides.sum_guides(guides.log_density_guide(log_density, scale_key="my_scale"), None,
                       guides.log_density_guide(log_density, scale_key="my_scale"))
    np.testing.assert_allclose(np.asarray(two(x, jnp.zeros(8, jnp.int32), {"my_scale": s})), 2 * np.asarray(g),
                               atol=1e-5)


def test_guidance_interval(gmm):
    sched = make_schedule("cosine", 1000, "50")
    x = _points(8)
    y = jnp.arange(8) % K
    lo, hi = 0.3, 2.0
    f = jax.jit(guides.classifier_free(gmm.model_fn, null_label=NULL, interval=(lo, hi), sched=sched))
    cg = jax.jit(guides.classifier_guide(gmm.logits_fn, interval=(lo, hi), sched=sched))
    eps = jax.jit(gmm.eps)
    cond = {"y": y, guides.CFG_SCALE: jnp.full((8,), 4.0), guides.CLASSIFIER_SCALE: jnp.full((8,), 2.0)}
    sig = np.exp(-0.5 * np.asarray(sched.log_snr))
    checked = {True: 0, False: 0}
    for idx in range(sched.num_steps):
        t = jnp.full((8,), sched.timestep_map[idx])
        np.testing.assert_allclose(float(guides.noise_level(sched, t)[0]), sig[idx], rtol=1e-6)
        active = lo <= sig[idx] <= hi
        eps_c, eps_u = eps(x, t, y), eps(x, t, None)
        want = eps_u + 4.0 * (eps_c - eps_u) if active else eps_c  # outside: s = 1 (plain conditional)
        np.testing.assert_allclose(np.asarray(f(x, t, cond)), np.asarray(want), atol=1e-5)
        g = np.asarray(cg(x, t, cond))
        assert (np.abs(g).max() > 0) if active else np.all(g == 0)
        checked[active] += 1
    assert checked[True] > 3 and checked[False] > 3


def test_dynamic_threshold():
    rng = np.random.default_rng(0)
    inside = jnp.asarray(rng.uniform(-0.9, 0.9, size=(2, 8, 8, 3)), jnp.float32)
    np.testing.assert_array_equal(np.asarray(guides.dynamic_threshold(inside)), np.asarray(inside))  # s = 1
    big = jnp.asarray(rng.normal(size=(3, 8, 8, 3)) * 3, jnp.float32)
    out = np.asarray(guides.dynamic_threshold(big, 0.995))
    for k in range(3):
        s = max(np.quantile(np.abs(np.asarray(big[k])), 0.995), 1.0)
        np.testing.assert_allclose(out[k], np.clip(np.asarray(big[k]), -s, s) / s, atol=1e-6)
        assert np.abs(out[k]).max() <= 1.0 + 1e-6


def test_cfg_rescale():
    rng = np.random.default_rng(1)
    c = jnp.asarray(rng.normal(size=(4, 8, 8, 3)), jnp.float32)
    u = jnp.asarray(rng.normal(size=(4, 8, 8, 3)) * 0.5, jnp.float32)
    s = jnp.full((4,), 5.0)
    plain = guides.guided_output(c, u, s)
    np.testing.assert_allclose(np.asarray(guides.guided_output(c, u, s, phi=jnp.zeros(4))), np.asarray(plain), atol=1e-6)
    full = guides.guided_output(c, u, s, phi=jnp.ones(4))
    np.testing.assert_allclose(np.asarray(jnp.std(full, axis=(1, 2, 3))), np.asarray(jnp.std(c, axis=(1, 2, 3))),
                               rtol=1e-5)
    half = guides.guided_output(c, u, s, phi=jnp.full((4,), 0.5))
    np.testing.assert_allclose(np.asarray(half), 0.5 * np.asarray(full) + 0.5 * np.asarray(plain), atol=1e-5)


def test_scales_are_traced_and_checked(gmm):
    traces = []

    def build(params):
        traces.append(1)
        return guidance.build_guides("both", gmm.model_fn, logits_fn=gmm.logits_fn, null_label=NULL)

    run = S.make_sampler(build, S.SamplerSpec("ddim", clip_denoised=False), (2,))
    sched = make_schedule("cosine", 1000, "5")
    ids = np.arange(6)
    outs = [run({}, sched, guides.make_cond(6, ids % K, cfg_scale=s, classifier_scale=s / 2), jax.random.key(0), ids)
            for s in (1.0, 2.0, 4.0)]
    assert len(traces) == 1  # new scale values reuse the compiled loop
    assert not np.allclose(np.asarray(outs[0]), np.asarray(outs[2]))
    with pytest.raises(ValueError, match="cfg_scale=nan"):
        guides.make_cond(6, ids % K, cfg_scale=float("nan"))
    with pytest.raises(ValueError, match="classifier_scale=inf"):
        guides.make_cond(6, ids % K, classifier_scale=np.inf)
    with pytest.raises(ValueError, match="unknown guidance kind 'nope'"):
        guidance.build_guides("nope", gmm.model_fn)


def test_raising_classifier_scale_raises_accuracy(gmm):
    n = 1500
    scales = np.array([0.0, 1.0, 4.0])
    y = np.tile(np.arange(n) % K, len(scales))
    s = np.repeat(scales, n)
    ids = np.arange(len(y))
    run = jax.jit(lambda cond, key, ids: S.sample_loop(
        gmm.uncond_model_fn, make_schedule("cosine", 1000, "50"), None, cond, sampler="ddim", key=key,
        sample_ids=ids, shape=(2,), cond_fn=guides.classifier_guide(gmm.logits_fn), clip_denoised=False))
    x = np.asarray(run(guides.make_cond(len(y), y, classifier_scale=s), jax.random.key(1), ids))
    pred = gmm.classify_clean(x)
    acc = [float(np.mean(pred[k * n:(k + 1) * n] == y[k * n:(k + 1) * n])) for k in range(len(scales))]
    assert acc[0] < 0.5 < acc[1] < acc[2], acc


def test_guides_refuse_networks_that_do_not_fit_the_model():
    model = {"model": {"kind": "text2im", "image_size": 64}, "diffusion": {"num_timesteps": 1000}}
    image = {"model": {"kind": "clip-image", "image_size": 64, "n_timesteps": 1000}}
    text = {"model": {"kind": "clip-text"}}
    guidance.GUIDES["clip"].check(model, {"clip_image": image, "clip_text": text})  # fits: no error
    with pytest.raises(ValueError, match="CLIP image encoder's image_size=32 differs from the model's image_size=64"):
        guidance.GUIDES["clip"].check(model, {"clip_image": {"model": dict(image["model"], image_size=32)}, "clip_text": text})
    with pytest.raises(ValueError, match="n_timesteps=1000 differs from the model's diffusion.num_timesteps=4000"):
        guidance.GUIDES["clip"].check(dict(model, diffusion={"num_timesteps": 4000}), {"clip_image": image, "clip_text": text})
    labels = {"model": {"kind": "unet", "num_classes": 10, "image_size": 8, "in_channels": 1}}
    classifier = {"model": {"kind": "classifier", "out_channels": 10, "image_size": 8, "in_channels": 3}}
    with pytest.raises(ValueError, match="the classifier's in_channels=3 differs from the model's in_channels=1"):
        guidance.GUIDES["classifier"].check(labels, {"classifier": classifier})


def test_classifier_free_calls_the_shared_input_form_once_with_b_rows():
    """A model_fn with `with_shared_input` is called through it (x, t of B rows, cond of 2B: [cond; uncond]),
    and CFG's result equals the plain call on the repeated input."""
    calls = []

    def model_fn(x, t, cond):
        return x * (1.0 + cond[guides.LABEL_KEY][:, None].astype(x.dtype)) + t[:, None]

    def shared(x, t, cond):
        calls.append((x.shape[0], cond[guides.LABEL_KEY].shape[0]))
        return model_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), cond)

    x, t = jnp.arange(6.0).reshape(3, 2), jnp.arange(3.0)
    cond = {guides.LABEL_KEY: jnp.array([1, 2, 0]), guides.CFG_SCALE: jnp.array([1.0, 3.0, 0.0])}
    plain = guides.classifier_free(model_fn, null_label=5)(x, t, cond)
    via = guides.classifier_free(guides.with_shared_input(model_fn, shared), null_label=5)(x, t, cond)
    assert calls == [(3, 6)]
    np.testing.assert_array_equal(np.asarray(via), np.asarray(plain))
