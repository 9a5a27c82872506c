"""Noise schedules and timestep respacing, computed in float64 as guided-diffusion does.

The numpy functions (`named_betas`, `space_timesteps`, `respace_betas`) reproduce
openai/guided-diffusion exactly; `make_schedule` turns their float64 results into the float32
`Schedule` pytree that the jitted diffusion, guidance and sampling code indexes.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.util import config as config_util

SCHEDULES = ("linear", "cosine")


def betas_for_alpha_bar(num_timesteps: int, alpha_bar, max_beta: float = 0.999) -> np.ndarray:
    """Betas that discretise a continuous alpha_bar(t), t in [0, 1], clipped at max_beta."""
    betas = []
    for i in range(num_timesteps):
        t1, t2 = i / num_timesteps, (i + 1) / num_timesteps
        betas.append(min(1.0 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.array(betas, dtype=np.float64)


def named_betas(name: str, num_timesteps: int) -> np.ndarray:
    """guided-diffusion's `get_named_beta_schedule`: "linear" or "cosine", float64."""
    if not config_util.is_int(num_timesteps) or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be a positive integer, got {num_timesteps!r}")
    if name == "linear":
        # Ho et al.'s 1e-4..0.02 for 1000 steps, scaled so any step count has the same endpoints.
        scale = 1000 / num_timesteps
        return np.linspace(scale * 0.0001, scale * 0.02, num_timesteps, dtype=np.float64)
    if name == "cosine":
        return betas_for_alpha_bar(num_timesteps, lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2)
    raise ValueError(f"unknown noise schedule {name!r}; allowed: {', '.join(SCHEDULES)}")


def space_timesteps(num_timesteps: int, section_counts: str | int | Sequence[int]) -> list[int]:
    """Timesteps kept by a guided-diffusion respacing string, sorted ascending.

    "250" keeps 250 evenly strided steps; "10,20,30" splits [0, T) into three equal sections and
    keeps 10, 20 and 30 steps in them; "ddim25" keeps range(0, T, stride) with exactly 25 entries.
    """
    if isinstance(section_counts, (int, np.integer)):
        section_counts = [int(section_counts)]
    elif isinstance(section_counts, str):
        text = section_counts.strip()
        if text.startswith("ddim"):
            try:
                desired = int(text[len("ddim"):])
            except ValueError:
                raise ValueError(f"bad respacing {section_counts!r}: expected 'ddimN' with integer N") from None
            if desired < 1:
                raise ValueError(f"bad respacing {section_counts!r}: N must be >= 1")
            for stride in range(1, num_timesteps + 1):
                if len(range(0, num_timesteps, stride)) == desired:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(f"respacing {section_counts!r}: cannot take exactly {desired} steps of "
                             f"{num_timesteps} with an integer stride")
        try:
            section_counts = [int(x) for x in text.split(",")]
        except ValueError:
            raise ValueError(f"bad respacing {section_counts!r}: allowed forms are 'N', 'N1,N2,...' or "
                             "'ddimN'") from None
    section_counts = list(section_counts)
    if not section_counts or any(c < 1 for c in section_counts):
        raise ValueError(f"bad respacing {section_counts!r}: every section needs at least one step")
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, steps = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"respacing asks for {count} steps in a section of only {size} of the "
                             f"{num_timesteps} schedule steps")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            steps.append(start + round(cur))
            cur += stride
        start += size
    return sorted(set(steps))


def respace_betas(betas: np.ndarray, use_timesteps: Iterable[int]) -> tuple[np.ndarray, np.ndarray]:
    """Betas of the chain that visits only `use_timesteps`, and the map index -> original t."""
    keep = set(int(t) for t in use_timesteps)
    alphas_cumprod = np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))
    last, new_betas, timestep_map = 1.0, [], []
    for i, ac in enumerate(alphas_cumprod):
        if i in keep:
            new_betas.append(1.0 - ac / last)
            last = ac
            timestep_map.append(i)
    return np.array(new_betas, dtype=np.float64), np.array(timestep_map, dtype=np.int64)


@flax.struct.dataclass
class Schedule:
    """Per-step coefficients of a (possibly respaced) discrete diffusion, float32 on device.

    Index i in [0, num_steps) is a step of this chain; `timestep_map[i]` is the original timestep
    the networks are conditioned on. All coefficients were computed in float64 and then cast.
    """

    betas: jax.Array
    alphas_cumprod: jax.Array
    alphas_cumprod_prev: jax.Array
    sqrt_alphas_cumprod: jax.Array
    sqrt_one_minus_alphas_cumprod: jax.Array
    sqrt_recip_alphas_cumprod: jax.Array
    sqrt_recipm1_alphas_cumprod: jax.Array
    log_betas: jax.Array
    posterior_variance: jax.Array
    posterior_log_variance_clipped: jax.Array
    posterior_mean_coef1: jax.Array
    posterior_mean_coef2: jax.Array
    fixed_large_log_variance: jax.Array
    log_snr: jax.Array  # log(alpha_bar / (1 - alpha_bar)) = 2 * lambda_t of DPM-Solver
    timestep_map: jax.Array
    num_train_timesteps: int = flax.struct.field(pytree_node=False, default=1000)

    @property
    def num_steps(self) -> int:
        return int(self.betas.shape[0])


def schedule_from_betas(betas: np.ndarray, timestep_map: np.ndarray | None = None,
                        num_train_timesteps: int | None = None) -> Schedule:
    """Build a `Schedule` from float64 betas exactly as GaussianDiffusion.__init__ does."""
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or not np.all((betas > 0) & (betas <= 1)):
        raise ValueError("betas must be a 1-D array with every entry in (0, 1]")
    if timestep_map is None:
        timestep_map = np.arange(len(betas))
    ac = np.cumprod(1.0 - betas)
    ac_prev = np.append(1.0, ac[:-1])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    # Posterior variance is 0 at t = 0; guided-diffusion clips its log with the t = 1 value.
    post_log_var = np.log(np.append(post_var[1], post_var[1:])) if len(betas) > 1 else np.log(betas)
    fixed_large = np.append(post_var[1], betas[1:]) if len(betas) > 1 else betas
    f32 = lambda a: jnp.asarray(np.asarray(a, dtype=np.float64), dtype=jnp.float32)
    return Schedule(
        betas=f32(betas),
        alphas_cumprod=f32(ac),
        alphas_cumprod_prev=f32(ac_prev),
        sqrt_alphas_cumprod=f32(np.sqrt(ac)),
        sqrt_one_minus_alphas_cumprod=f32(np.sqrt(1.0 - ac)),
        sqrt_recip_alphas_cumprod=f32(np.sqrt(1.0 / ac)),
        sqrt_recipm1_alphas_cumprod=f32(np.sqrt(1.0 / ac - 1.0)),
        log_betas=f32(np.log(betas)),
        posterior_variance=f32(post_var),
        posterior_log_variance_clipped=f32(post_log_var),
        posterior_mean_coef1=f32(betas * np.sqrt(ac_prev) / (1.0 - ac)),
        posterior_mean_coef2=f32((1.0 - ac_prev) * np.sqrt(1.0 - betas) / (1.0 - ac)),
        fixed_large_log_variance=f32(np.log(fixed_large)),
        log_snr=f32(np.log(ac) - np.log1p(-ac)),
        timestep_map=jnp.asarray(np.asarray(timestep_map), dtype=jnp.int32),
        num_train_timesteps=int(num_train_timesteps or len(betas)),
    )


def logsnr_timesteps(alphas_cumprod, num_steps: int, lambda_min: float = -5.0) -> list[int]:
    """`num_steps` distinct timesteps spaced (nearly) uniformly in lambda = 0.5 log SNR.

    DPM-Solver's "logSNR" spacing ("logsnrN"): T - 1 first, 0 last, the others the timesteps nearest
    to lambdas uniform between max(lambda(T - 1), lambda_min) and lambda(0), each strictly below the
    previous one (sorted ascending). `lambda_min` keeps the cosine schedule's clipped last beta from
    drawing steps into the pure-noise region.
    """
    ac = np.asarray(alphas_cumprod, np.float64)
    T = len(ac)
    n = int(num_steps)
    if not 1 <= n <= T:
        raise ValueError(f"logSNR spacing asks for {num_steps} steps; allowed: 1..{T} (the schedule's steps)")
    if n == 1:
        return [T - 1]
    lam = 0.5 * (np.log(ac) - np.log1p(-ac))
    lo = min(max(lam[-1], lambda_min), lam[0])
    targets = np.linspace(lo, lam[0], n)
    chosen, upper = [T - 1], T - 1
    for k in range(1, n - 1):
        cand = np.arange(n - 1 - k, upper)  # leave room for the remaining steps
        t = int(cand[np.argmin(np.abs(lam[cand] - targets[k]))])
        chosen.append(t)
        upper = t
    chosen.append(0)
    return sorted(chosen)


def leading_timesteps(num_timesteps: int, num_steps: int) -> list[int]:
    """diffusers' "leading" timestep spacing (steps_offset 0): k * (T // N) for k = 0..N-1, sorted
    ascending (T = 1000, N = 5: 0, 200, 400, 600, 800). What DeepFloyd IF's DDPMScheduler samples."""
    T, n = int(num_timesteps), int(num_steps)
    if not 1 <= n <= T:
        raise ValueError(f"leading spacing asks for {num_steps} steps; allowed: 1..{T} (the schedule's steps)")
    return [k * (T // n) for k in range(n)]


def unclip_timesteps(num_timesteps: int, num_steps: int) -> list[int]:
    """diffusers' UnCLIPScheduler spacing (Karlo's): round(k * (T - 1) / (N - 1)) for k = 0..N-1, sorted
    ascending, so the chain runs from T - 1 to 0 (T = 1000, N = 5: 0, 250, 500, 749, 999; numpy's rounding)."""
    T, n = int(num_timesteps), int(num_steps)
    if not 2 <= n <= T:
        raise ValueError(f"unCLIP spacing asks for {num_steps} steps; allowed: 2..{T} (it runs from T - 1 to 0)")
    return [int(t) for t in np.round(np.arange(n) * ((T - 1) / (n - 1))).astype(np.int64)]


def _steps_of(respacing: str, prefix: str) -> int:
    try:
        return int(respacing.strip()[len(prefix):])
    except ValueError:
        raise ValueError(f"bad respacing {respacing!r}: expected '{prefix}N' with integer N") from None


def respaced_timesteps(betas: np.ndarray, respacing: str | int | Sequence[int]) -> list[int]:
    """Timesteps kept by a respacing: guided-diffusion's strings ("250", "ddim25", "10,20,30"),
    "logsnrN" (N steps uniform in log SNR, for DPM-Solver++), "leadingN" (diffusers' "leading"
    spacing, `leading_timesteps`) or "unclipN" (`unclip_timesteps`)."""
    if isinstance(respacing, str) and respacing.strip().startswith("unclip"):
        return unclip_timesteps(len(betas), _steps_of(respacing, "unclip"))
    if isinstance(respacing, str) and respacing.strip().startswith("leading"):
        return leading_timesteps(len(betas), _steps_of(respacing, "leading"))
    if isinstance(respacing, str) and respacing.strip().startswith("logsnr"):
        return logsnr_timesteps(np.cumprod(1.0 - betas), _steps_of(respacing, "logsnr"))
    return space_timesteps(len(betas), respacing)


def unclip_schedule(betas: np.ndarray, num_steps: int) -> Schedule:
    """The respaced chain of diffusers' UnCLIPScheduler over `unclip_timesteps`, its coefficients in float32
    as that scheduler computes them: betas cast to float32, alphas = 1 - betas in float32, their cumulative
    product in float64 cast to float32 (torch's), then per step beta = 1 - abar_t / abar_prev (the original
    beta when no step is skipped), the posterior's coefficients and variance from those float32 values.
    (The float64 `schedule_from_betas` differs from it by up to 5e-4 relative at the last step, where
    diffusers' 1 - abar_0 and beta_0 differ by float32 rounding.)"""
    f = np.float32
    b32 = np.asarray(betas, np.float64).astype(f)
    ac = np.cumprod((f(1) - b32).astype(np.float64)).astype(f)
    ts = unclip_timesteps(len(b32), num_steps)
    one = f(1)
    cols = {k: [] for k in ("beta", "ac", "ac_prev", "coef1", "coef2", "var")}
    for i, t in enumerate(ts):
        prev = ts[i - 1] if i else -1
        a_t, a_prev = ac[t], (ac[prev] if prev >= 0 else one)
        bp_t, bp_prev = one - a_t, one - a_prev
        beta = b32[t] if prev == t - 1 else one - a_t / a_prev
        cols["beta"].append(beta)
        cols["ac"].append(a_t)
        cols["ac_prev"].append(a_prev)
        cols["coef1"].append(np.sqrt(a_prev) * beta / bp_t)
        cols["coef2"].append(np.sqrt(one - beta) * bp_prev / bp_t)
        cols["var"].append(bp_prev / bp_t * beta)
    c = {k: np.asarray(v, f) for k, v in cols.items()}
    var = c["var"]
    log_var = np.log(np.maximum(np.append(var[1] if len(var) > 1 else c["beta"][0], var[1:]), f(1e-20)))
    sqrt_ac = np.sqrt(c["ac"])
    j = lambda a: jnp.asarray(np.asarray(a, f))  # noqa: E731
    return Schedule(
        betas=j(c["beta"]), alphas_cumprod=j(c["ac"]), alphas_cumprod_prev=j(c["ac_prev"]),
        sqrt_alphas_cumprod=j(sqrt_ac), sqrt_one_minus_alphas_cumprod=j(np.sqrt(one - c["ac"])),
        sqrt_recip_alphas_cumprod=j(one / sqrt_ac), sqrt_recipm1_alphas_cumprod=j(np.sqrt(one - c["ac"]) / sqrt_ac),
        log_betas=j(np.log(c["beta"])), posterior_variance=j(var), posterior_log_variance_clipped=j(log_var),
        posterior_mean_coef1=j(c["coef1"]), posterior_mean_coef2=j(c["coef2"]),
        fixed_large_log_variance=j(np.log(c["beta"])),
        log_snr=j(np.log(c["ac"].astype(np.float64)) - np.log1p(-c["ac"].astype(np.float64))),
        timestep_map=jnp.asarray(np.asarray(ts), dtype=jnp.int32), num_train_timesteps=len(b32))


def make_schedule(name: str = "cosine", num_timesteps: int = 1000,
                  respacing: str | int | Sequence[int] | None = None) -> Schedule:
    """The schedule `name` over `num_timesteps`, optionally respaced ("250", "ddim25", "10,20",
    "logsnr20", "leading50", "unclip25")."""
    betas = named_betas(name, num_timesteps)
    if isinstance(respacing, str) and respacing.strip().startswith("unclip"):
        return unclip_schedule(betas, _steps_of(respacing, "unclip"))
    if respacing in (None, ""):
        return schedule_from_betas(betas, num_train_timesteps=num_timesteps)
    new_betas, tmap = respace_betas(betas, respaced_timesteps(betas, respacing))
    return schedule_from_betas(new_betas, tmap, num_train_timesteps=num_timesteps)
