"""ModelConfig: the sizes and architecture of a model, one dataclass with a preset per size.

Not the parameters (params.py) nor any computation: a config is what a file's metadata or a
training flag says, checked once here so that every later layer can trust it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

ARCHITECTURES = ("gpt2", "llama", "qwen2", "qwen3", "gemma3")
LAYER_TYPES = ("sliding_attention", "full_attention")   # Hugging Face's names, per layer


@dataclass
class ModelConfig:
    """Sizes and architecture of a model (GPT-2, Llama, Qwen2, Qwen3 or Gemma 3 family)."""

    vocab_size: int = 50304
    block_size: int = 256          # longest sequence (learned position embeddings cover it)
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    arch: str = "gpt2"             # "gpt2": LayerNorm, learned positions, GELU MLP, biases;
                                   # "llama": RMSNorm, rotary positions, SwiGLU MLP, GQA, no biases;
                                   # "qwen2": llama with biases on q, k and v;
                                   # "qwen3": llama with an RMSNorm on each q and k head;
                                   # "gemma3": qwen3 with GeGLU, norms after each sub-block too,
                                   # embeddings scaled by sqrt(n_embd), local and global layers
    norm_eps: float = 1e-5
    intermediate_size: Optional[int] = None   # feed-forward width; default 4 * n_embd
    n_kv_head: Optional[int] = None           # grouped-query attention (Llama); default n_head
    rope_theta: float = 10000.0               # rotary embeddings (Llama)
    tie_word_embeddings: bool = True          # the output head is the token embedding
    head_dim: Optional[int] = None            # per attention head; default n_embd // n_head (not gpt2)
    sliding_window: Optional[int] = None      # each query sees only the last this many keys (Mistral)
    rope_scaling: Optional[dict] = None       # {"rope_type": "llama3", "factor", "low_freq_factor",
                                              #  "high_freq_factor", "original_max_position_embeddings"}
                                              # (Hugging Face's), {"rope_type": "linear", "factor"},
                                              # or {"rope_type": "freq_factors", "factors": [HS/2
                                              # numbers]} (a GGUF's rope_freqs); global layers only
    layer_types: Optional[list] = None        # per layer "sliding_attention" or "full_attention";
                                              # None: with a sliding_window every layer slides
                                              # (Mistral), or every sixth is global (gemma3)
    rope_local_theta: Optional[float] = None  # gemma3's sliding layers' rope base (default rope_theta)
    query_pre_attn_scalar: Optional[float] = None   # scores scaled by its -1/2 power (default head_size)
    final_logit_softcapping: Optional[float] = None  # logits = c tanh(logits / c) (Gemma 2's kind)

    PRESETS = {  # name -> (n_layer, n_head, n_embd, block_size)
        "tiny": (2, 2, 64, 64),
        "small": (6, 6, 384, 256),
        "gpt2": (12, 12, 768, 1024),
    }

    # Far past every released model, and small enough that no file's or flag's size makes a loop or
    # an allocation without end before the sizes are compared with the bytes there are.
    LIMITS = {"vocab_size": 1 << 24, "block_size": 1 << 24, "n_layer": 4096, "n_head": 4096, "n_embd": 1 << 17,
              "intermediate_size": 1 << 20, "n_kv_head": 4096, "head_dim": 1 << 14, "sliding_window": 1 << 24}

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        for name in ("intermediate_size", "n_kv_head"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1):
                raise ValueError(f"ModelConfig.{name} must be a positive integer or None, got {value!r}")
        for name, limit in self.LIMITS.items():
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool) and isinstance(value, (int, np.integer)) \
                    and value > limit:
                raise ValueError(f"ModelConfig.{name} is {value}, more than pyllm supports ({limit})")
        for name in ("rope_theta", "norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or \
                    not (math.isfinite(value) and value > 0):
                raise ValueError(f"ModelConfig.{name} must be a finite number > 0, got {value!r}")
        if not isinstance(self.tie_word_embeddings, (bool, np.bool_)):
            raise ValueError(f"ModelConfig.tie_word_embeddings must be true or false, got {self.tie_word_embeddings!r}")
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"ModelConfig.arch {self.arch!r} is not supported (choose from {ARCHITECTURES})")
        if self.head_dim is not None:
            if isinstance(self.head_dim, bool) or not isinstance(self.head_dim, (int, np.integer)) or self.head_dim < 1:
                raise ValueError(f"ModelConfig.head_dim must be a positive integer or None, got {self.head_dim!r}")
            if self.arch == "gpt2" and self.head_dim * self.n_head != self.n_embd:
                raise ValueError(f"gpt2 models have head_dim == n_embd / n_head; got {self.head_dim}")
            if self.head_dim * self.n_head == self.n_embd:
                self.head_dim = None   # the default, spelled out
        elif self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head}), or head_dim set")
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.n_embd
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.n_kv_head < 1 or self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if self.arch == "gpt2" and self.n_kv_head != self.n_head:
            raise ValueError(f"gpt2 models have n_kv_head == n_head; got {self.n_kv_head} and {self.n_head}")
        if self.arch != "gpt2" and self.head_size % 2:
            raise ValueError(f"rotary embeddings need an even head size, got {self.head_size}")
        if self.sliding_window is not None:
            if isinstance(self.sliding_window, bool) or not isinstance(self.sliding_window, (int, np.integer)) \
                    or self.sliding_window < 1:
                raise ValueError(f"ModelConfig.sliding_window must be a positive integer or None, "
                                 f"got {self.sliding_window!r}")
            if self.arch == "gpt2":
                raise ValueError("gpt2 models have no sliding-window attention")
        if self.rope_scaling is not None:
            if self.arch == "gpt2":
                raise ValueError("gpt2 models have no rotary embeddings to scale")
            self.rope_freq_factors()   # checks the fields
        if self.layer_types is not None:
            self.layer_types = list(self.layer_types)
            if len(self.layer_types) != self.n_layer or any(t not in LAYER_TYPES for t in self.layer_types):
                raise ValueError(f"ModelConfig.layer_types must name {self.n_layer} layers, each one of "
                                 f"{LAYER_TYPES}; got {self.layer_types!r}")
            if self.sliding_window is None and "sliding_attention" in self.layer_types:
                raise ValueError("sliding_attention layers need a sliding_window")
            if "sliding_attention" not in self.layer_types:    # one spelling per meaning: no window
                self.layer_types, self.sliding_window = None, None
            elif self.layer_types == self._default_layer_types():
                self.layer_types = None
        for name in ("rope_local_theta", "query_pre_attn_scalar", "final_logit_softcapping"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float, np.floating)) and
                                          not isinstance(value, bool) and math.isfinite(value) and value > 0):
                raise ValueError(f"ModelConfig.{name} must be a positive number or None, got {value!r}")
        if self.arch == "gpt2" and (self.query_pre_attn_scalar or self.final_logit_softcapping or self.layer_types):
            raise ValueError("gpt2 models have no query scalar, logit soft-capping or layer types")
        if self.query_pre_attn_scalar is not None and float(self.query_pre_attn_scalar) == self.head_size:
            self.query_pre_attn_scalar = None   # the default, spelled out
        if self.rope_local_theta is not None and float(self.rope_local_theta) == float(self.rope_theta):
            self.rope_local_theta = None
        if self.arch != "gemma3" and self.rope_local_theta is not None:
            raise ValueError("rope_local_theta is the rope base of gemma3's sliding layers; other models have one base")

    # Shapes of released models (their sizes; vocab_size comes from the tokenizer trained).
    SHAPED_PRESETS = {
        "smollm2-135m": dict(arch="llama", n_layer=30, n_head=9, n_kv_head=3, n_embd=576, intermediate_size=1536,
                             block_size=2048, rope_theta=100000.0, norm_eps=1e-5),
        "qwen3-0.6b": dict(arch="qwen3", n_layer=28, n_head=16, n_kv_head=8, n_embd=1024, head_dim=128,
                           intermediate_size=3072, block_size=4096, rope_theta=1000000.0, norm_eps=1e-6),
        "gemma3-270m": dict(arch="gemma3", n_layer=18, n_head=4, n_kv_head=1, n_embd=640, head_dim=256,
                            intermediate_size=2048, block_size=32768, sliding_window=512, rope_theta=1000000.0,
                            rope_local_theta=10000.0, norm_eps=1e-6),
    }

    @classmethod
    def preset(cls, name: str, arch: Optional[str] = None, **overrides) -> "ModelConfig":
        """A named size with any field overridden: tiny, small, gpt2 (GPT-2's widths, in any
        architecture: the Llama-shaped ones get half as many key/value heads and a SwiGLU width of
        8/3 the channels, a multiple of 32; gemma3 a sliding window of a quarter of the block), or a
        released model's shape (smollm2-135m, qwen3-0.6b, gemma3-270m)."""
        if name in cls.SHAPED_PRESETS:
            fields = dict(cls.SHAPED_PRESETS[name])
            if arch is not None and arch != fields["arch"]:
                raise ValueError(f"the preset {name!r} is a {fields['arch']} model, not {arch}")
        elif name in cls.PRESETS:
            n_layer, n_head, n_embd, block_size = cls.PRESETS[name]
            fields = dict(arch=arch or "gpt2", n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size)
            fields.update(overrides)
            if fields["arch"] != "gpt2":   # widths derived from the (overridden) heads and channels
                heads = fields["n_head"]
                fields.setdefault("n_kv_head", heads // 2 if heads % 2 == 0 else heads)
                fields.setdefault("intermediate_size", 32 * -(-fields["n_embd"] // 12))
            if fields["arch"] == "gemma3":   # Gemma's local layers: a window of a quarter of the context
                fields.setdefault("sliding_window", max(1, fields["block_size"] // 4))
                fields.setdefault("rope_local_theta", 10000.0)
                fields.setdefault("rope_theta", 1000000.0)
        else:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(cls.PRESETS) + sorted(cls.SHAPED_PRESETS)}")
        fields.update(overrides)
        return cls(**fields)

    @property
    def head_size(self) -> int:
        return self.head_dim or self.n_embd // self.n_head

    def _default_layer_types(self) -> list:
        """What layer_types None means with a sliding window: every layer slides (Mistral), or
        every sixth layer is global (Gemma 3)."""
        if self.arch == "gemma3":
            return ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(self.n_layer)]
        return ["sliding_attention"] * self.n_layer

    def layer_window(self, i: int) -> int:
        """How many of the latest keys layer i's queries see (0: all of them)."""
        if self.sliding_window is None:
            return 0
        types = self.layer_types or self._default_layer_types()
        return int(self.sliding_window) if types[i] == "sliding_attention" else 0

    def layer_is_local(self, i: int) -> bool:
        """Layer i uses the local rope: Gemma 3's sliding layers, whose rope has its own base
        (rope_local_theta, default rope_theta) and no scaling."""
        return self.arch == "gemma3" and self.layer_window(i) > 0

    @property
    def query_scale(self) -> float:
        """What q is multiplied by before attention's 1/sqrt(head_size), so that scores are scaled
        by query_pre_attn_scalar^-1/2 instead (1 without one)."""
        if self.query_pre_attn_scalar is None:
            return 1.0
        return math.sqrt(self.head_size / float(self.query_pre_attn_scalar))

    def rope_freq_factors(self) -> Optional[np.ndarray]:
        """What each rotary frequency is divided by (HS/2 numbers), or None for plain rope.
        Llama 3: frequencies whose wavelength exceeds the original context / low_freq_factor are
        divided by `factor`, those below the original context / high_freq_factor kept, and those
        between blended smoothly, as transformers' llama3 rope computes them."""
        s = self.rope_scaling
        if s is None:
            return None
        half = self.head_size // 2
        kind = s.get("rope_type", s.get("type")) if isinstance(s, dict) else None
        if kind == "freq_factors":
            factors = np.asarray(s.get("factors", ()), np.float64)
            if factors.shape != (half,) or not (np.isfinite(factors).all() and (factors > 0).all()):
                raise ValueError(f"rope_scaling freq_factors must be {half} finite numbers > 0")
            return factors
        if kind == "linear":   # positions divided by factor: every frequency divided by it
            factor = s.get("factor")
            if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor >= 1 \
                    or not math.isfinite(factor):
                raise ValueError(f"linear rope_scaling needs a finite factor >= 1, got {s!r}")
            return np.full(half, float(factor))
        if kind != "llama3":
            raise ValueError(f"rope_scaling {s!r} is not supported (llama3, linear and freq_factors are)")
        try:
            factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
            original = float(s["original_max_position_embeddings"])
        except (KeyError, TypeError, ValueError):
            raise ValueError("llama3 rope_scaling needs factor, low_freq_factor, high_freq_factor and "
                             "original_max_position_embeddings") from None
        if not (factor >= 1 and 0 < low < high and original > 0):
            raise ValueError(f"llama3 rope_scaling needs factor >= 1 and 0 < low_freq_factor < high_freq_factor, "
                             f"got {s!r}")
        inv_freq = 1.0 / self.rope_theta ** (np.arange(0, self.head_size, 2, dtype=np.float64) / self.head_size)
        wavelen = 2 * np.pi / inv_freq
        smooth = (original / wavelen - low) / (high - low)
        factors = 1.0 / ((1 - smooth) / factor + smooth)
        factors = np.where(wavelen > original / low, factor, factors)
        return np.where(wavelen < original / high, 1.0, factors)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
