"""The few-step flow-matching schedule of the distilled ``worldstereo-memory-dmd`` variant.

The generator runs ``steps`` Euler steps of the velocity field on the
timesteps ``linspace(start, N, steps)`` reversed, each divided by ``N``,
shifted by ``s t / (1 + (s - 1) t)`` and multiplied back by ``N``. Noise level
``sigma = t / N``; ``x_t = (1 - sigma) x_0 + sigma * noise``; a step moves
``x <- x + (sigma_next - sigma) * velocity`` with ``sigma_next = 0`` after the last.

The values the released DMD checkpoint was distilled with are not published
in the reference repository; they are read from the variant's ``config.json``
(``dmd_start_steps``, ``dmd_end_steps``, ``gen_shift``, ``dmd_steps``) when it
has them. The defaults here are the reference class's defaults except the
shift, where its own example uses 5.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ...bridge.errors import KeyframeWorldsError


@dataclass(frozen=True)
class DMDSchedulerConfig:
    start_timesteps: float = 250
    num_train_timesteps: int = 1000
    shift: float = 5.0
    steps: int = 4

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.num_train_timesteps, int) or isinstance(self.num_train_timesteps, bool) \
                or self.num_train_timesteps <= 0:
            problems.append(f"num_train_timesteps must be a positive integer, got {self.num_train_timesteps!r}")
        elif not isinstance(self.start_timesteps, (int, float)) or not 0 <= self.start_timesteps < self.num_train_timesteps:
            problems.append(f"start_timesteps must lie in [0, {self.num_train_timesteps}), got {self.start_timesteps!r}")
        if not isinstance(self.shift, (int, float)) or isinstance(self.shift, bool) or self.shift <= 0:
            problems.append(f"shift must be positive, got {self.shift!r}")
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 1:
            problems.append(f"steps must be a positive integer, got {self.steps!r}")
        if problems:
            raise KeyframeWorldsError("DMD scheduler config is invalid: " + "; ".join(problems))


class DMDScheduler:
    """Timesteps, noising and Euler steps of the distilled generator (all float32)."""

    def __init__(self, config: DMDSchedulerConfig = DMDSchedulerConfig()):
        self.config = config
        n = config.num_train_timesteps
        # linspace in float64 and rounded once to float32, then float32 arithmetic,
        # which is what the reference produces bit for bit.
        ramp = np.linspace(config.start_timesteps, n, config.steps, dtype=np.float32)[::-1].copy()
        t = torch.from_numpy(ramp) / n
        t = config.shift * t / (1 + (config.shift - 1) * t)
        self.timesteps = t * n  # [steps], descending, first = N

    @property
    def sigmas(self) -> torch.Tensor:
        return self.timesteps / self.config.num_train_timesteps

    def add_noise(self, sample: torch.Tensor, noise: torch.Tensor, timestep: torch.Tensor | float) -> torch.Tensor:
        """``(1 - sigma) * sample + sigma * noise``; ``timestep`` scalar or ``[B]`` (per batch item)."""
        sigma = torch.as_tensor(timestep, dtype=torch.float32, device=sample.device) / self.config.num_train_timesteps
        if sigma.ndim == 1:
            sigma = sigma.view(-1, *([1] * (sample.ndim - 1)))
        elif sigma.ndim != 0:
            raise KeyframeWorldsError(f"timestep must be a scalar or [B], got {list(sigma.shape)}")
        return (1 - sigma) * sample + sigma * noise

    def step(self, model_output: torch.Tensor, sample: torch.Tensor, index: int) -> torch.Tensor:
        """One Euler step from ``timesteps[index]`` to the next (to sigma 0 after the last)."""
        if not 0 <= index < len(self.timesteps):
            raise KeyframeWorldsError(f"step index {index} is outside 0..{len(self.timesteps) - 1}")
        n = self.config.num_train_timesteps
        sigma = self.timesteps[index] / n
        sigma_next = self.timesteps[index + 1] / n if index + 1 < len(self.timesteps) else 0.0
        return sample + (sigma_next - sigma) * model_output
