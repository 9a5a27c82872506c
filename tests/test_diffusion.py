import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.diffusion import gaussian as D
from jaxdiff.diffusion.schedules import make_schedule

SCHED = make_schedule("cosine", 1000, "50")


def _data(key=0, shape=(6, 4, 4, 3)):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(key), 3)
    x0 = jnp.tanh(jax.random.normal(k1, shape))
    eps = jax.random.normal(k2, shape)
    t = jax.random.randint(k3, (shape[0],), 0, SCHED.num_steps)
    return x0, eps, t


def test_parameterisations_round_trip():
    x0, eps, t = _data()
    xt = D.q_sample(SCHED, x0, t, eps)
    v = D.v_from_eps_x0(SCHED, t, eps, x0)
    for pred, kind in [(eps, "eps"), (x0, "x0"), (v, "v")]:
        np.testing.assert_allclose(D.to_x0(SCHED, xt, t, pred, kind), x0, atol=2e-3, rtol=1e-3)
        # eps from x0 is ill-conditioned at t = 0; check where it is not
        ok = np.asarray(t) > 2
        np.testing.assert_allclose(np.asarray(D.to_eps(SCHED, xt, t, pred, kind))[ok], np.asarray(eps)[ok], atol=2e-3)


def test_q_posterior_matches_bayes_rule_in_float64():
    betas = np.asarray(SCHED.betas, np.float64)
    ac = np.cumprod(1 - betas)
    t = 7
    x0, xt = 0.3, -0.5
    ac_prev = ac[t - 1]
    # q(x_{t-1}|x0) = N(sqrt(ac_prev) x0, 1 - ac_prev); q(x_t|x_{t-1}) = N(sqrt(1-b) x_{t-1}, b)
    prec = 1 / (1 - ac_prev) + (1 - betas[t]) / betas[t]
    mean = (np.sqrt(ac_prev) * x0 / (1 - ac_prev) + np.sqrt(1 - betas[t]) * xt / betas[t]) / prec
    m, var, _ = D.q_posterior(SCHED, jnp.full((1, 1), x0), jnp.full((1, 1), xt), jnp.array([t]))
    np.testing.assert_allclose(float(m[0, 0]), mean, rtol=1e-5)
    np.testing.assert_allclose(float(var[0, 0]), 1 / prec, rtol=1e-5)


def test_learned_variance_interpolates_between_bounds():
    t = jnp.array([5, 5])
    lo = D.model_log_variance(SCHED, t, jnp.full((2, 1), -1.0), 2)
    hi = D.model_log_variance(SCHED, t, jnp.full((2, 1), 1.0), 2)
    np.testing.assert_allclose(lo, SCHED.posterior_log_variance_clipped[5], rtol=1e-6)
    np.testing.assert_allclose(hi, jnp.log(SCHED.betas[5]), rtol=1e-6)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_mse_loss_is_zero_for_the_perfect_prediction(prediction):
    x0, eps, t = _data()
    target = D.training_target(SCHED, x0, t, eps, prediction)
    losses = D.training_losses(SCHED, lambda xt, tt: target, x0, t, eps, prediction=prediction)
    np.testing.assert_allclose(losses["loss"], 0.0, atol=1e-10)
    bad = D.training_losses(SCHED, lambda xt, tt: target + 1.0, x0, t, eps, prediction=prediction)
    np.testing.assert_allclose(bad["loss"], 1.0, rtol=1e-5)


def test_hybrid_loss_trains_variance_only_through_vb():
    x0, eps, t = _data()

    def loss(pred, var):
        return D.training_losses(SCHED, lambda xt, tt: jnp.concatenate([pred, var], -1), x0, t, eps,
                                 learned_sigma=True)

    pred, var = eps + 0.1, jnp.zeros_like(eps)
    g_pred_vb = jax.grad(lambda p: loss(p, var)["vb"].sum())(pred)
    g_var = jax.grad(lambda v: loss(pred, v)["loss"].sum())(var)
    assert float(jnp.abs(g_pred_vb).max()) == 0.0
    assert float(jnp.abs(g_var).max()) > 0.0
    out = loss(pred, var)
    np.testing.assert_allclose(out["loss"], out["mse"] + out["vb"], rtol=1e-6)
    assert np.all(np.isfinite(out["vb"])) and np.all(np.asarray(out["vb"]) >= 0)


def test_vb_is_decoder_nll_at_t0_and_kl_elsewhere():
    x0, eps, _ = _data()
    t = jnp.array([0, 0, 3, 3, 10, 10])
    xt = D.q_sample(SCHED, x0, t, eps)
    # the true posterior mean as model mean makes the KL ~0 for t > 0 with the exact variance
    out = jnp.concatenate([eps, -jnp.ones_like(eps)], -1)  # frac 0 -> posterior variance
    vb = D.vb_terms_bpd(SCHED, out, x0, xt, t, learned_sigma=True)
    assert np.all(np.asarray(vb[2:]) < 1e-3)
    assert np.all(np.asarray(vb[:2]) > 0)


def test_unknown_prediction_is_refused():
    with pytest.raises(ValueError, match="unknown prediction target 'score'"):
        D.training_target(SCHED, 0.0, 0, 0.0, "score")
