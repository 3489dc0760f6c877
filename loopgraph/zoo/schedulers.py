"""Diffusers-like stateful schedulers: flow-matching Euler, Euler (epsilon, sigma space), DDIM.

These are written in the diffusers idiom *on purpose*, because that is what users' denoising loops
look like and what the loop compiler has to cope with:

* a Python-int step counter ``_step_index`` that is ``None`` until the first ``scale_model_input`` /
  ``step`` call, which then finds it with ``(self.timesteps == t).nonzero().item()`` unless a begin
  index was set with ``set_begin_index``;
* ``timesteps`` on the caller's device but ``sigmas`` (and ``alphas_cumprod``) kept on **CPU** and
  indexed with Python ints, giving 0-d CPU tensors that mix with device tensors;
* ``step`` upcasts to float32 and casts the result back to the model output's dtype.

Typical loop::

    s = build_scheduler("flow_euler")
    s.set_timesteps(25, device=x.device)
    x = noise * s.init_noise_sigma
    for i, t in enumerate(s.timesteps):
        x = s.step(model(s.scale_model_input(x, t), t, ctx), t, x, return_dict=False)[0]
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch

__all__ = [
    "SchedulerOutput",
    "FlowMatchEulerConfig",
    "EulerConfig",
    "DDIMConfig",
    "FlowMatchEulerScheduler",
    "EulerScheduler",
    "DDIMScheduler",
    "build_scheduler",
]


@dataclass
class SchedulerOutput:
    prev_sample: torch.Tensor


# ----------------------------------------------------------------------------------------------------
# configs
# ----------------------------------------------------------------------------------------------------

_BETA_SCHEDULES = ("linear", "scaled_linear")
_TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")


def _check_train_timesteps(n: int) -> None:
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"num_train_timesteps must be an int >= 1, got {n!r}")


def _check_betas(beta_start: float, beta_end: float, beta_schedule: str) -> None:
    if beta_schedule not in _BETA_SCHEDULES:
        raise ValueError(f"beta_schedule must be one of {_BETA_SCHEDULES}, got {beta_schedule!r}")
    if not (0.0 < beta_start < 1.0 and 0.0 < beta_end < 1.0):
        raise ValueError(f"beta_start and beta_end must lie in (0, 1), got {beta_start!r}, {beta_end!r}")


@dataclass(frozen=True)
class FlowMatchEulerConfig:
    num_train_timesteps: int = 1000
    shift: float = 1.0

    def __post_init__(self) -> None:
        _check_train_timesteps(self.num_train_timesteps)
        if self.shift <= 0:
            raise ValueError(f"shift must be > 0, got {self.shift!r}")


@dataclass(frozen=True)
class EulerConfig:
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    timestep_spacing: str = "linspace"

    def __post_init__(self) -> None:
        _check_train_timesteps(self.num_train_timesteps)
        _check_betas(self.beta_start, self.beta_end, self.beta_schedule)
        if self.timestep_spacing not in _TIMESTEP_SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {_TIMESTEP_SPACINGS}, got {self.timestep_spacing!r}")


@dataclass(frozen=True)
class DDIMConfig:
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    eta: float = 0.0
    set_alpha_to_one: bool = True

    def __post_init__(self) -> None:
        _check_train_timesteps(self.num_train_timesteps)
        _check_betas(self.beta_start, self.beta_end, self.beta_schedule)
        if self.eta < 0:
            raise ValueError(f"eta must be >= 0, got {self.eta!r}")


# ----------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------


def _alphas_cumprod(num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str) -> torch.Tensor:
    """[num_train_timesteps] float32 CPU table of prod(1 - beta), built in float32 like diffusers."""
    n = num_train_timesteps
    if beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, n, dtype=torch.float32)
    else:  # scaled_linear (Stable Diffusion)
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def _interp(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Linear interpolation of ``table`` (values at 0, 1, ..., len-1) at positions ``x`` (like np.interp).

    x: any shape float64, table: [T] float64 -> same shape as x.
    """
    x = x.clamp(0, table.shape[0] - 1)
    lo = x.floor().long()
    hi = (lo + 1).clamp(max=table.shape[0] - 1)
    w = x - lo.to(x.dtype)
    return table[lo] * (1 - w) + table[hi] * w


def _per_sample(values: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
    """Broadcast a 0-d or [B] coefficient against ``sample`` [B, ...] (on its device, float32)."""
    values = values.to(device=sample.device, dtype=torch.float32)
    if values.ndim == 0:
        return values
    return values.reshape(values.shape[0], *([1] * (sample.ndim - 1)))


# ----------------------------------------------------------------------------------------------------
# base
# ----------------------------------------------------------------------------------------------------


class _Scheduler:
    """Shared diffusers-style state machine: tables, step index, begin index, the step template."""

    order = 1
    config: FlowMatchEulerConfig | EulerConfig | DDIMConfig

    def __init__(self) -> None:
        self.timesteps: torch.Tensor | None = None  # [N] on the device given to set_timesteps
        self.sigmas: torch.Tensor | None = None  # [N+1] float32, always CPU, last entry 0
        self.num_inference_steps: int | None = None
        self._step_index: int | None = None
        self._begin_index: int | None = None

    # -- state -------------------------------------------------------------------------------------

    @property
    def step_index(self) -> int | None:
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    @property
    def init_noise_sigma(self) -> float:
        return 1.0

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start the step counter at ``begin_index`` instead of looking the first timestep up."""
        if not isinstance(begin_index, int) or begin_index < 0:
            raise ValueError(f"begin_index must be an int >= 0, got {begin_index!r}")
        self._begin_index = begin_index

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None) -> None:
        """Build the timestep/sigma tables for ``num_inference_steps`` steps and reset the step state."""
        n_train = self.config.num_train_timesteps
        try:  # accept any integer-like (numpy / torch ints), reject floats
            num_inference_steps = operator.index(num_inference_steps)
        except TypeError:
            pass
        if not isinstance(num_inference_steps, int) or not 1 <= num_inference_steps <= n_train:
            raise ValueError(
                f"num_inference_steps must be an int in [1, num_train_timesteps={n_train}], "
                f"got {num_inference_steps!r}"
            )
        self.num_inference_steps = num_inference_steps
        timesteps, sigmas = self._build_tables(num_inference_steps)
        self.timesteps = timesteps.to(device)
        # CPU on purpose (as in diffusers): indexed with Python ints, yields 0-d CPU scalars.
        self.sigmas = sigmas.to(device="cpu", dtype=torch.float32)
        self._step_index = None
        self._begin_index = None

    def _build_tables(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (timesteps [n], sigmas [n+1] with a trailing 0), both on CPU."""
        raise NotImplementedError

    # -- step index --------------------------------------------------------------------------------

    def index_for_timestep(
        self, timestep: torch.Tensor | float | int, schedule_timesteps: torch.Tensor | None = None
    ) -> int:
        if schedule_timesteps is None:
            schedule_timesteps = self.timesteps
        indices = (schedule_timesteps == timestep).nonzero()
        if len(indices) == 0:
            raise ValueError(f"timestep {timestep!r} is not one of the scheduler's timesteps")
        # If the timestep occurs twice (e.g. img2img starting mid-schedule), take the second one so no
        # sigma is skipped by accident -- same rule as diffusers.
        pos = 1 if len(indices) > 1 else 0
        return indices[pos].item()

    def _init_step_index(self, timestep: torch.Tensor | float | int) -> None:
        if self.begin_index is None:
            if isinstance(timestep, torch.Tensor):
                timestep = timestep.to(self.timesteps.device)
            self._step_index = self.index_for_timestep(timestep)
        else:
            self._step_index = self._begin_index

    def _prepare(self, timestep: torch.Tensor | float | int) -> None:
        """Common entry of scale_model_input/step: check readiness, init and bound-check the index."""
        if self.timesteps is None or self.num_inference_steps is None:
            raise ValueError(f"{type(self).__name__}: call set_timesteps(num_inference_steps) before stepping")
        if self._step_index is None:
            self._init_step_index(timestep)
        if self._step_index >= self.num_inference_steps:
            raise ValueError(
                f"{type(self).__name__}: step index {self._step_index} is past the end of the "
                f"{self.num_inference_steps}-step schedule; call set_timesteps before running the loop again"
            )

    # -- public API --------------------------------------------------------------------------------

    def scale_model_input(self, sample: torch.Tensor, timestep: torch.Tensor | float | int) -> torch.Tensor:
        self._prepare(timestep)
        return sample

    def step(
        self,
        model_output: torch.Tensor,
        timestep: torch.Tensor | float | int,
        sample: torch.Tensor,
        return_dict: bool = True,
        generator: torch.Generator | None = None,
    ) -> SchedulerOutput | tuple[torch.Tensor]:
        """Advance ``sample`` by one step. ``generator`` is only used by DDIM with eta > 0."""
        self._prepare(timestep)
        # Upcast like diffusers: the update is done in float32, the result returned in the model's dtype.
        prev_sample = self._step(model_output.to(torch.float32), sample.to(torch.float32), generator)
        prev_sample = prev_sample.to(model_output.dtype)
        self._step_index += 1
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)

    def _step(
        self, model_output: torch.Tensor, sample: torch.Tensor, generator: torch.Generator | None
    ) -> torch.Tensor:
        raise NotImplementedError

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor | float | int
    ) -> torch.Tensor:
        """Forward process q(x_t | x_0) at ``timesteps`` (0-d or [B]); for building test inputs."""
        raise NotImplementedError

    def __len__(self) -> int:
        return self.config.num_train_timesteps


# ----------------------------------------------------------------------------------------------------
# flow matching
# ----------------------------------------------------------------------------------------------------


class FlowMatchEulerScheduler(_Scheduler):
    """Euler for rectified flow (SD3/Flux style): x_t = (1 - sigma) x0 + sigma noise, model predicts
    the velocity v = noise - x0, update ``prev = sample + (sigma_next - sigma) * v``.

    Sigmas go linearly from 1 to 1/num_train_timesteps over N steps, then the shift
    ``shift*s / (1 + (shift-1)*s)`` is applied, then a final 0 is appended; timesteps = sigmas * 1000.
    """

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0) -> None:
        super().__init__()
        self.config = FlowMatchEulerConfig(num_train_timesteps=num_train_timesteps, shift=shift)

    def _build_tables(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        n_train, shift = self.config.num_train_timesteps, self.config.shift
        sigmas = torch.linspace(1.0, 1.0 / n_train, n, dtype=torch.float64)
        sigmas = (shift * sigmas / (1 + (shift - 1) * sigmas)).to(torch.float32)
        timesteps = sigmas * n_train  # float32, like diffusers
        return timesteps, torch.cat([sigmas, sigmas.new_zeros(1)])

    def _step(self, model_output, sample, generator):
        sigma = self.sigmas[self._step_index]  # 0-d CPU tensor, Python-int index
        sigma_next = self.sigmas[self._step_index + 1]
        return sample + (sigma_next - sigma) * model_output

    def add_noise(self, original_samples, noise, timesteps):
        # timesteps are sigma * num_train_timesteps, so sigma is recovered for any timestep.
        sigma = _per_sample(torch.as_tensor(timesteps, dtype=torch.float32) / self.config.num_train_timesteps,
                            original_samples)
        return ((1 - sigma) * original_samples + sigma * noise).to(original_samples.dtype)


# ----------------------------------------------------------------------------------------------------
# Euler (epsilon prediction, sigma space)
# ----------------------------------------------------------------------------------------------------


class EulerScheduler(_Scheduler):
    """Euler in sigma space for epsilon-prediction models (diffusers' EulerDiscreteScheduler, no churn).

    x_sigma = x0 + sigma * noise with sigma(t) = sqrt((1 - alphas_cumprod[t]) / alphas_cumprod[t]);
    the model sees ``sample / sqrt(sigma^2 + 1)`` and predicts eps.
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        timestep_spacing: str = "linspace",
    ) -> None:
        super().__init__()
        self.config = EulerConfig(num_train_timesteps, beta_start, beta_end, beta_schedule, timestep_spacing)
        self.alphas_cumprod = _alphas_cumprod(num_train_timesteps, beta_start, beta_end, beta_schedule)
        # sigma at every training timestep, float64 so interpolation matches np.interp (diffusers).
        self._train_sigmas = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).to(torch.float64)

    @property
    def init_noise_sigma(self) -> float:
        # Std of x_T for unit-variance data. (Recent diffusers returns plain max_sigma for
        # "linspace"/"trailing" spacing; the difference is ~0.2% at sigma_max ~ 14.6.)
        table = self.sigmas if self.sigmas is not None else self._train_sigmas
        return float((table.max() ** 2 + 1) ** 0.5)

    def _build_tables(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        n_train, spacing = self.config.num_train_timesteps, self.config.timestep_spacing
        steps = torch.arange(n, dtype=torch.float64)
        if spacing == "linspace":
            timesteps = torch.linspace(0, n_train - 1, n, dtype=torch.float64).flip(0)
        elif spacing == "leading":
            timesteps = (steps * (n_train // n)).round().flip(0)
        else:  # trailing
            timesteps = (n_train - steps * (n_train / n)).round() - 1
        timesteps = timesteps.to(torch.float32)  # diffusers keeps float32 timesteps
        sigmas = _interp(timesteps.to(torch.float64), self._train_sigmas).to(torch.float32)
        return timesteps, torch.cat([sigmas, sigmas.new_zeros(1)])

    def scale_model_input(self, sample, timestep):
        self._prepare(timestep)
        sigma = self.sigmas[self._step_index]  # 0-d CPU tensor
        return sample / ((sigma**2 + 1) ** 0.5)

    def _step(self, model_output, sample, generator):
        sigma = self.sigmas[self._step_index]
        sigma_next = self.sigmas[self._step_index + 1]
        pred_original_sample = sample - sigma * model_output
        derivative = (sample - pred_original_sample) / sigma
        return sample + derivative * (sigma_next - sigma)

    def add_noise(self, original_samples, noise, timesteps):
        t = torch.as_tensor(timesteps).to(device="cpu", dtype=torch.float64)
        sigma = _per_sample(_interp(t, self._train_sigmas), original_samples)
        return (original_samples + sigma * noise).to(original_samples.dtype)


# ----------------------------------------------------------------------------------------------------
# DDIM
# ----------------------------------------------------------------------------------------------------


class DDIMScheduler(_Scheduler):
    """DDIM for epsilon-prediction models with "leading" timestep spacing (diffusers' default).

    x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise. ``a_t`` and ``a_prev`` are read from the CPU
    ``alphas_cumprod`` table with Python ints: t comes from the Python list of this schedule's
    timesteps at ``_step_index`` (not from the tensor argument, which would need ``.item()``), and
    ``prev_t = t - num_train_timesteps // N``. No sample clipping / thresholding.
    ``self.sigmas`` holds the equivalent ``sqrt((1 - a) / a)`` at each timestep (+ a final 0).
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        eta: float = 0.0,
        set_alpha_to_one: bool = True,
    ) -> None:
        super().__init__()
        self.config = DDIMConfig(num_train_timesteps, beta_start, beta_end, beta_schedule, eta, set_alpha_to_one)
        self.alphas_cumprod = _alphas_cumprod(num_train_timesteps, beta_start, beta_end, beta_schedule)
        # alpha used when prev_t < 0 (after the last step): 1 means "fully denoised".
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self._timestep_values: list[int] = []

    def _build_tables(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        step_ratio = self.config.num_train_timesteps // n
        timesteps = (torch.arange(n, dtype=torch.int64) * step_ratio).flip(0)  # leading spacing
        self._timestep_values = timesteps.tolist()
        a = self.alphas_cumprod[timesteps]
        sigmas = ((1 - a) / a) ** 0.5
        return timesteps, torch.cat([sigmas, sigmas.new_zeros(1)])

    def _step(self, model_output, sample, generator):
        t = self._timestep_values[self._step_index]  # Python int
        prev_t = t - self.config.num_train_timesteps // self.num_inference_steps
        alpha_prod_t = self.alphas_cumprod[t]  # 0-d CPU tensors
        alpha_prod_t_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        beta_prod_t = 1 - alpha_prod_t

        pred_original_sample = (sample - beta_prod_t**0.5 * model_output) / alpha_prod_t**0.5
        eta = self.config.eta
        # DDIM eq. 16: sigma_t = eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
        variance = (1 - alpha_prod_t_prev) / beta_prod_t * (1 - alpha_prod_t / alpha_prod_t_prev)
        std_dev_t = eta * variance**0.5
        direction = (1 - alpha_prod_t_prev - std_dev_t**2) ** 0.5 * model_output
        prev_sample = alpha_prod_t_prev**0.5 * pred_original_sample + direction
        if eta > 0:  # Python float config value, not a tensor branch
            noise = torch.randn(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
            prev_sample = prev_sample + std_dev_t * noise
        return prev_sample

    def add_noise(self, original_samples, noise, timesteps):
        t = torch.as_tensor(timesteps).to(device="cpu", dtype=torch.int64)
        a = _per_sample(self.alphas_cumprod[t], original_samples)
        return (a**0.5 * original_samples + (1 - a) ** 0.5 * noise).to(original_samples.dtype)


# ----------------------------------------------------------------------------------------------------
# factory
# ----------------------------------------------------------------------------------------------------

_SCHEDULERS: dict[str, type[_Scheduler]] = {
    "flow_euler": FlowMatchEulerScheduler,
    "euler": EulerScheduler,
    "ddim": DDIMScheduler,
}


def build_scheduler(name: str, **config: object) -> _Scheduler:
    """Build a scheduler by name ("flow_euler", "euler", "ddim"); ``config`` goes to its constructor."""
    if name not in _SCHEDULERS:
        raise ValueError(f"unknown scheduler name {name!r}; known names: {sorted(_SCHEDULERS)}")
    return _SCHEDULERS[name](**config)
