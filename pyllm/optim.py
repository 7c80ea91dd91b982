"""AdamW over a model's flat parameter buffer, gradient clipping, and the learning-rate schedule.

The model keeps its decayed parameters (matmul weights) first in the flat buffer, so an update is
two calls of the fused C++ AdamW kernel: one with weight decay, one without.
"""

from __future__ import annotations

import math

import numpy as np

from pyllm import kernels


def global_norm(grads: np.ndarray) -> float:
    """The L2 norm of a flat gradient buffer (chunks summed in float64, so long buffers stay exact).

    einsum rather than np.dot: a BLAS call would wake OpenBLAS's threads, which then spin and
    compete with the kernels' own threads for the cores.
    """
    total, chunk = 0.0, 1 << 20
    for start in range(0, grads.size, chunk):
        part = grads[start:start + chunk]
        total += float(np.einsum("i,i->", part, part))
    return math.sqrt(total)


class AdamW:
    """Decoupled-weight-decay Adam (Loshchilov & Hutter) on every parameter of `model`.

    Weight decay applies to the matmul weights only; embeddings, biases and norms are not decayed.
    `step(lr=...)` overrides the learning rate for one step (for schedules).
    """

    def __init__(self, model, lr: float = 3e-4, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.1, grad_clip: float | None = None) -> None:
        if not lr >= 0 or not 0 <= betas[0] < 1 or not 0 <= betas[1] < 1 or not eps > 0 or not weight_decay >= 0:
            raise ValueError(f"AdamW: invalid hyper-parameters lr={lr}, betas={betas}, eps={eps}, "
                             f"weight_decay={weight_decay}")
        if grad_clip is not None and not grad_clip > 0:
            raise ValueError(f"grad_clip must be positive or None, got {grad_clip!r}")
        self.model = model
        self.lr, self.betas, self.eps = float(lr), (float(betas[0]), float(betas[1])), float(eps)
        self.weight_decay, self.grad_clip = float(weight_decay), grad_clip
        self.m = np.zeros_like(model.params)
        self.v = np.zeros_like(model.params)
        self.step_count = 0
        self.last_grad_norm = 0.0

    def step(self, lr: float | None = None) -> None:
        """Updates the parameters from model.grads (clipped to grad_clip by global norm, if set)."""
        lr = self.lr if lr is None else float(lr)
        if not (math.isfinite(lr) and lr >= 0):   # before anything moves: a NaN rate would ruin every weight
            raise ValueError(f"the learning rate must be a finite number >= 0, got {lr!r}")
        scale = 1.0
        self.last_grad_norm = self._grad_norm()
        if not math.isfinite(self.last_grad_norm):
            raise FloatingPointError(f"the gradient norm is {self.last_grad_norm}")
        self.step_count += 1
        if self.grad_clip is not None:
            if self.last_grad_norm > self.grad_clip:
                scale = self.grad_clip / (self.last_grad_norm + 1e-6)
        n = self.model.num_decayed
        p, g = self.model.params, self.model.grads
        for sl, decay in ((slice(0, n), self.weight_decay), (slice(n, None), 0.0)):
            if p[sl].size:
                kernels.adamw(p[sl], g[sl], self.m[sl], self.v[sl], lr=lr, step=self.step_count,
                              beta1=self.betas[0], beta2=self.betas[1], eps=self.eps,
                              weight_decay=decay, grad_scale=scale)

    def _grad_norm(self) -> float:
        """The norm clipping reads (ZeRO-1's sharded AdamW sums it over the ranks' shards)."""
        return global_norm(self.model.grads)

    def state_dict(self) -> dict:
        """Moments as arrays and the step count: what a checkpoint needs to resume exactly."""
        return {"m": self.m, "v": self.v, "step": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        for key in ("m", "v"):
            if np.shape(state[key]) != self.m.shape:
                raise ValueError(f"optimizer state {key} has shape {np.shape(state[key])}, "
                                 f"the model needs {self.m.shape}")
        self.m[...] = state["m"]
        self.v[...] = state["v"]
        self.step_count = int(state["step"])


def cosine_lr(step: int, max_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0,
              restart: tuple[int, float] | None = None) -> float:
    """Linear warm-up over warmup_steps, then cosine decay from max_lr to min_lr at total_steps.
    restart (step s0, rate r0): from s0 on, a cosine from r0 down to min_lr at total_steps instead
    (a run extended past its first horizon goes on from the rate it had, without a jump).

    step counts from 0.
    >>> round(cosine_lr(0, 1.0, 10, 100), 2), cosine_lr(100, 1.0, 10, 100, 0.1)
    (0.1, 0.1)
    >>> cosine_lr(50, 1.0, 10, 200, 0.0, restart=(50, 0.3))
    0.3
    """
    if restart is not None and step >= restart[0]:
        s0, r0 = restart
        if step >= total_steps:
            return min_lr
        return min_lr + 0.5 * (r0 - min_lr) * (1.0 + math.cos(math.pi * (step - s0) / max(1, total_steps - s0)))
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (max_lr - min_lr) * (1.0 + math.cos(math.pi * progress))
