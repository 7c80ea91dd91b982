"""LoRA: low-rank adapters on a model's projection matrices (Llama or GPT-2), trained while the base
weights stay frozen.

The base may be kept quantized (a GGUF model): its products, forward and the input gradient
backward, run on the quantized blocks while the adapters train in float32.

A projection y = x W^T becomes y = x W^T + (alpha / r) (x A^T) B^T with A (r, in) and B (out, r);
B starts at zero, so a fresh adapter changes nothing. The adapters live in one flat buffer (and
their gradients in another) like the model's parameters, so AdamW trains them with the same fused
kernel. Names and files follow `peft` (pyllm.io.peft). The model's `linear` (pyllm.models.layers)
calls forward and backward for every projection it computes; this module is not imported by it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from pyllm.io.peft import PREFIX as PEFT_PREFIX
from pyllm.io.peft import read_adapter, write_adapter
from pyllm.kernels import unchecked as fast
from pyllm.models import parameter_specs

# The projections adapters may sit on, per architecture: target name (as peft's target_modules
# spells it) -> the weights it names in layer i. GPT-2's c_proj names both the attention output
# and the MLP output, as it does in peft.
_LLAMA_TARGETS = {t: (f"model.layers.{{i}}.{m}.{t}.weight",) for t, m in
                  (("q_proj", "self_attn"), ("k_proj", "self_attn"), ("v_proj", "self_attn"), ("o_proj", "self_attn"),
                   ("gate_proj", "mlp"), ("up_proj", "mlp"), ("down_proj", "mlp"))}
TARGETS = {
    "llama": _LLAMA_TARGETS, "qwen2": _LLAMA_TARGETS, "qwen3": _LLAMA_TARGETS,   # Qwen names them as Llama
    "gemma3": _LLAMA_TARGETS,                                                     # and Gemma
    "gpt2": {"c_attn": ("transformer.h.{i}.attn.c_attn.weight",),
             "c_proj": ("transformer.h.{i}.attn.c_proj.weight", "transformer.h.{i}.mlp.c_proj.weight"),
             "c_fc": ("transformer.h.{i}.mlp.c_fc.weight",)},
}


@dataclass
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    targets: Optional[tuple] = None   # None: every projection of the architecture (TARGETS)
    dropout: float = 0.0    # on the adapter's input, in training steps only (as peft's lora_dropout)
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or int(self.rank) != self.rank or not 1 <= self.rank <= MAX_RANK:
            raise ValueError(f"rank must be an integer in [1, {MAX_RANK}], got {self.rank!r}")
        if not math.isfinite(self.alpha):
            raise ValueError(f"alpha must be a finite number, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout!r}")
        known = {t for table in TARGETS.values() for t in table}
        if self.targets is not None and (set(self.targets) - known or not self.targets):
            raise ValueError(f"LoRA targets must be among {sorted(known)}, got "
                             f"{sorted(set(self.targets) - known) or 'none'}")


MAX_RANK = 1 << 14   # wider than any layer pyllm runs: an adapter can be no wider than its layer


@dataclass
class _Site:
    base: str           # the frozen weight's name, e.g. model.layers.0.self_attn.q_proj.weight
    out: int
    inp: int
    index: int          # tells the sites' dropout masks apart
    saved: dict = field(default_factory=dict)   # x A^T of the last forward, for backward


class LoRA:
    """Adapters for `model` (Llama or GPT-2). `params`, `grads` and `num_decayed` make it something
    pyllm.AdamW can train."""

    def __init__(self, model, config: LoRAConfig = LoRAConfig()) -> None:
        table = TARGETS[model.config.arch]
        self.targets = tuple(config.targets or table)
        if set(self.targets) - set(table):
            raise ValueError(f"a {model.config.arch} model's LoRA targets are {sorted(table)}, got "
                             f"{sorted(set(self.targets) - set(table))}")
        self.config, self.scale = config, config.alpha / config.rank
        # GPT-2 stores its projections as (in, out) (HF's Conv1D), Llama as (out, in).
        self.transposed = model.config.arch == "gpt2"
        shapes = {s.name: s.shape for s in parameter_specs(model.config)}   # quantized weights too
        self.sites: dict[str, _Site] = {}
        for i in range(model.config.n_layer):
            for target in self.targets:
                for pattern in table[target]:
                    base = pattern.format(i=i)
                    out, inp = shapes[base][::-1] if self.transposed else shapes[base]
                    self.sites[base] = _Site(base, out, inp, len(self.sites))
        r = config.rank
        sizes = [(s.base, r * s.inp, s.out * r) for s in self.sites.values()]
        self.num_params = sum(a + b for _, a, b in sizes)
        self.num_decayed = self.num_params
        self.params = np.zeros(self.num_params, np.float32)
        self.grads = np.zeros(self.num_params, np.float32)
        self.A, self.B, self.gA, self.gB = {}, {}, {}, {}
        offset = 0
        for base, a_size, b_size in sizes:
            site = self.sites[base]
            self.A[base] = self.params[offset:offset + a_size].reshape(r, site.inp)
            self.gA[base] = self.grads[offset:offset + a_size].reshape(r, site.inp)
            offset += a_size
            self.B[base] = self.params[offset:offset + b_size].reshape(site.out, r)
            self.gB[base] = self.grads[offset:offset + b_size].reshape(site.out, r)
            offset += b_size
        rng = np.random.default_rng(config.seed)
        for base, site in self.sites.items():   # peft's default: A ~ U(+-1/sqrt(in)), B = 0
            bound = 1.0 / math.sqrt(site.inp)
            self.A[base][...] = rng.uniform(-bound, bound, self.A[base].shape).astype(np.float32)
        # Set (to a per-step seed) while a training step runs: dropout is then on. Each site's mask
        # follows from (seed, site), so backward regenerates it instead of keeping it.
        self.dropout_seed: Optional[int] = None

    def _dropped(self, x: np.ndarray, base: str) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """(x after this step's dropout for the site, the mask) or (x, None) when dropout is off."""
        mask = self.dropout_mask(base, x.shape)
        return (x, None) if mask is None else (x * mask, mask)

    def dropout_mask(self, base: str, shape: tuple) -> Optional[np.ndarray]:
        """The kept inputs scaled by 1 / (1 - p) (dropout's mask), or None when dropout is off."""
        p = self.config.dropout
        if self.dropout_seed is None or p == 0:
            return None
        rng = np.random.default_rng([self.dropout_seed, self.sites[base].index])
        keep = rng.random(shape, dtype=np.float32) >= np.float32(p)
        return keep * np.float32(1.0 / (1.0 - p))

    # ------------------------------------------------------------------ called by the model's linear

    def forward(self, out: np.ndarray, x: np.ndarray, base: str, columns: Optional[slice] = None) -> None:
        """out[:, columns] += scale (x A^T) B^T for the projection `base`; saves x A^T."""
        site = self.sites.get(base)
        if site is None:
            return
        M, r = x.shape[0], self.config.rank
        x, mask = self._dropped(x, base)
        u = np.empty((M, r), np.float32)
        fast.matmul_forward(u, x, self.A[base], None, M, site.inp, r, True)
        delta = np.empty((M, site.out), np.float32)
        fast.matmul_forward(delta, u, self.B[base], None, M, r, site.out, True)
        delta *= np.float32(self.scale)
        if columns is None:
            out += delta
        else:
            out[:, columns] += delta
        site.saved["u"] = u

    def backward(self, dx: np.ndarray, dy: np.ndarray, x: np.ndarray, base: str) -> None:
        """Adds the adapter's gradients (A, B) and its share of dx, given dy of the projection."""
        site = self.sites.get(base)
        if site is None:
            return
        M, r = x.shape[0], self.config.rank
        x, mask = self._dropped(x, base)
        dy = np.ascontiguousarray(dy) * np.float32(self.scale)
        u = site.saved["u"]
        fast.matmul_backward(None, self.gB[base], None, dy, u, self.B[base], M, r, site.out, True)   # gB += dy^T u
        du = np.empty((M, r), np.float32)
        fast.matmul_forward(du, dy, self.B[base], None, M, site.out, r, False)                      # du = dy B
        fast.matmul_backward(None, self.gA[base], None, du, x, self.A[base], M, site.inp, r, True)   # gA += du^T x
        dxa = np.empty((M, site.inp), np.float32)
        fast.matmul_forward(dxa, du, self.A[base], None, M, r, site.inp, False)                     # du A
        if mask is not None:
            dxa *= mask
        dx += dxa

    # ------------------------------------------------------------------ files and merging

    def zero_grad(self) -> None:
        self.grads.fill(0.0)

    def merge_into(self, model) -> None:
        """Adds scale B A into every adapted base weight (then the adapters can be dropped)."""
        kept = [base for base in self.sites if base in model.quantized]
        if kept:
            raise ValueError(f"{kept[0]} is kept quantized: merge into model.dequantized() instead")
        for base in self.sites:
            delta = (np.float32(self.scale) * (self.B[base].astype(np.float64) @ self.A[base].astype(np.float64))
                     ).astype(np.float32)
            model.p[base][...] += delta.T if self.transposed else delta

    def state_dict(self) -> dict[str, np.ndarray]:
        """peft's names: base_model.model.<module>.lora_A.weight / lora_B.weight."""
        state = {}
        for base in self.sites:
            module = base[: -len(".weight")]
            state[f"{PEFT_PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(self.A[base])
            state[f"{PEFT_PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(self.B[base])
        return state

    def save(self, directory, base_model: str = "") -> None:
        """adapter_model.safetensors and adapter_config.json, as `peft` writes and reads them."""
        config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": self.config.rank,
                  "lora_alpha": self.config.alpha, "lora_dropout": self.config.dropout, "bias": "none",
                  "target_modules": sorted(self.targets), "fan_in_fan_out": self.transposed,
                  "base_model_name_or_path": base_model, "inference_mode": True}
        write_adapter(directory, config, self.state_dict())

    @classmethod
    def load(cls, model, directory) -> "LoRA":
        """The adapters of a peft (or pyllm) adapter folder, for `model`."""
        config, state = read_adapter(directory)
        if config.get("peft_type") != "LORA":
            raise ValueError(f"{directory}: not a LoRA adapter (peft_type {config.get('peft_type')!r})")
        unsupported = [k for k in ("use_dora", "use_rslora", "lora_bias") if config.get(k)]
        unsupported += [k for k in ("rank_pattern", "alpha_pattern") if config.get(k)]     # {} means none
        unsupported += [k for k in ("layers_to_transform", "modules_to_save") if config.get(k) is not None]
        if config.get("bias", "none") != "none":
            unsupported.append("bias")
        if unsupported:
            raise ValueError(f"{directory}: adapter options pyllm does not apply: {', '.join(unsupported)}")
        missing = [k for k in ("target_modules", "r", "lora_alpha") if k not in config]
        if missing:
            raise ValueError(f"{directory}: adapter_config.json lacks {', '.join(missing)}")
        targets, rank, alpha, dropout = (config["target_modules"], config["r"], config["lora_alpha"],
                                         config.get("lora_dropout") or 0.0)
        targets = tuple(targets) if isinstance(targets, list) else (targets,)
        if not targets or not all(isinstance(t, str) for t in targets):
            raise ValueError(f"{directory}: target_modules must name modules (strings), got {config['target_modules']!r}")
        for name, value in (("r", rank), ("lora_alpha", alpha), ("lora_dropout", dropout)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{directory}: {name} must be a number, got {value!r}")
        if int(rank) != rank:
            raise ValueError(f"{directory}: r must be an integer, got {rank!r}")
        try:
            lora = cls(model, LoRAConfig(rank=int(rank), alpha=float(alpha), targets=targets, dropout=float(dropout)))
        except ValueError as exc:
            raise ValueError(f"{directory}: {exc}") from None
        expected = set(lora.state_dict())
        unexpected = sorted(set(state) - expected)
        if unexpected:
            raise ValueError(f"{directory}: tensors pyllm's adapters do not have: {', '.join(unexpected[:3])}")
        for base in lora.sites:
            module = base[: -len(".weight")]
            for part, views in (("lora_A", lora.A), ("lora_B", lora.B)):
                key = f"{PEFT_PREFIX}{module}.{part}.weight"
                if key not in state or state[key].shape != views[base].shape:
                    raise ValueError(f"{directory}: {key} missing or of the wrong shape")
                views[base][...] = state[key]
        return lora
