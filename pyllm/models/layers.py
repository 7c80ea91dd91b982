"""The layers every architecture shares: one `linear` (and its backward) for every kind of weight
(the output head is one too, blocks.head_projection), the norms and the token embedding.

A projection's weight may be float32 in either layout (Llama's (out, in), GPT-2's Conv1D (in, out)),
kept in a ggml block format (a GGUF model), a fused block of adjacent weights (q, k and v as one
product) whose parts may be quantized in different types, and may carry LoRA adapters; `linear`
takes all of them, so each architecture writes its math once. Calls go through
`pyllm.kernels.unchecked`: the model checks its inputs once at its boundary (transformer.py).
Not the block skeleton (blocks.py) nor an architecture's own pieces (gpt2.py, llama.py).
Shape legend: N rows (B*T), C channels, V vocabulary, F feed-forward width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

import numpy as np

from pyllm.kernels import unchecked as fast
from pyllm.models.params import QuantizedWeight
from pyllm.models.workspace import Workspace


class Adapters(Protocol):
    """What a LoRA adapter set (pyllm.lora.LoRA) offers the layers: out[:, columns] += its delta,
    and its share of the input gradient (plus its own gradients) in backward."""

    def forward(self, out: np.ndarray, x: np.ndarray, base: str, columns: Optional[slice] = None) -> None: ...

    def backward(self, dx: np.ndarray, dy: np.ndarray, x: np.ndarray, base: str) -> None: ...


class Weights(Protocol):
    """What the layers read from a model (pyllm.models.Transformer)."""

    p: dict[str, np.ndarray]
    quantized: dict[str, QuantizedWeight]
    lora: Optional[Adapters]
    int8_activations: bool
    frozen: bool          # adapters train: no base weight gets a gradient

    def float_weight(self, proj: "Projection") -> np.ndarray: ...

    def float_grad(self, proj: "Projection") -> Optional[np.ndarray]: ...   # None when frozen

    def bias(self, proj: "Projection") -> Optional[np.ndarray]: ...         # None without a bias

    def bias_grad(self, proj: "Projection") -> Optional[np.ndarray]: ...    # None when frozen or no bias

    def scratch(self, name: str, shape: tuple) -> np.ndarray: ...


@dataclass(frozen=True)
class Projection:
    """out (N, self.out) = x (N, self.inp) W^T (+ bias): one linear layer, named as in state_dict."""

    weight: str                          # a parameter, or a fused name over `parts`
    inp: int
    out: int
    bias: Optional[str] = None           # a parameter, or with parts the fused name over bias_parts
    parts: tuple = ()                    # fused: ((parameter name, its output columns), ...), adjacent
    bias_parts: tuple = ()               # fused: the parts' biases, adjacent in the same order
    in_out: bool = False                 # the float weight is stored (in, out) (GPT-2's Conv1D)

    @property
    def sites(self) -> tuple:
        """(weight name, output columns) of each adaptable weight: where LoRA may sit."""
        return self.parts or ((self.weight, None),)


@dataclass(frozen=True)
class Layer:
    """The parameter names and projections of one transformer block."""

    norm1: tuple          # (weight, bias or None) of the norm before attention
    qkv: Projection       # q, k and v as one product: columns [q (NH HS) | k (NKV HS) | v (NKV HS)]
    o: Projection
    norm2: tuple
    mlp: tuple            # the feed-forward's projections, in the architecture's order
    qk_norm: Optional[tuple] = None   # (q weight, k weight): an RMSNorm over each q and k head (Qwen3)
    post_norms: Optional[tuple] = None   # (after attention, after the feed-forward) norms' weights,
                                         # applied to each sub-block's output before its residual (Gemma)
    window: int = 0                      # queries see only this many latest keys (0: all)
    local_rope: bool = False             # rope with the config's local base (Gemma's sliding layers)


# ----------------------------------------------------------------------------- linear

def linear(model: Weights, proj: Projection, out: np.ndarray, x: np.ndarray) -> None:
    """out (M, proj.out) = x (M, proj.inp) @ W^T + bias, plus the LoRA adapters on its weights."""
    M = x.shape[0]
    quantized = model.quantized.get(proj.weight)
    if quantized is not None:
        fast.matmul_quant(out, x, quantized.data, quantized.ggml_type, M, proj.inp, proj.out,
                          model.int8_activations, quantized.packed)
        if proj.bias is not None:
            out += model.bias(proj)
    elif proj.parts and proj.parts[0][0] in model.quantized:   # fused parts in different quantized types
        for name, cols in proj.parts:
            part = model.quantized[name]
            piece = model.scratch(f"linear_part.{cols.start}", (M, cols.stop - cols.start))
            fast.matmul_quant(piece, x, part.data, part.ggml_type, M, proj.inp, piece.shape[1],
                              model.int8_activations, part.packed)
            out[:, cols] = piece
        if proj.bias is not None:
            out += model.bias(proj)
    else:
        bias = model.bias(proj)
        fast.matmul_forward(out, x, model.float_weight(proj), bias, M, proj.inp, proj.out, not proj.in_out)
    if model.lora is not None:
        for site, cols in proj.sites:
            model.lora.forward(out, x, site, cols)


def linear_backward(model: Weights, proj: Projection, dx: np.ndarray, dout: np.ndarray, x: np.ndarray) -> None:
    """dx (M, proj.inp) = dout (M, proj.out) @ W (overwritten), and W's and the bias's gradients
    accumulated unless the model is frozen (a quantized weight must be); then the adapters' share."""
    M = x.shape[0]
    quantized = model.quantized.get(proj.weight)
    split = quantized is None and proj.parts and proj.parts[0][0] in model.quantized
    if quantized is not None or split:
        if not model.frozen:
            raise ValueError(f"{proj.weight} is kept quantized and cannot be trained (train LoRA adapters on it)")
        if quantized is not None:
            fast.matmul_quant_backward(dx, dout, quantized.data, quantized.ggml_type, M, proj.inp, proj.out,
                                       quantized.packed)
        else:
            part_dx = model.scratch("linear_part_dx", dx.shape)
            for k, (name, cols) in enumerate(proj.parts):
                part = model.quantized[name]
                part_dout = model.scratch(f"linear_part_dout.{cols.start}", (M, cols.stop - cols.start))
                np.copyto(part_dout, dout[:, cols])
                fast.matmul_quant_backward(dx if k == 0 else part_dx, part_dout, part.data, part.ggml_type, M,
                                           proj.inp, part_dout.shape[1], part.packed)
                if k:
                    dx += part_dx
    else:
        fast.matmul_backward(dx, model.float_grad(proj), model.bias_grad(proj), dout, x, model.float_weight(proj),
                             M, proj.inp, proj.out, not proj.in_out)
    if model.lora is not None:
        for site, cols in proj.sites:
            model.lora.backward(dx, dout if cols is None else dout[:, cols], x, site)


# ----------------------------------------------------------------------------- norms

class Norm:
    """LayerNorm (GPT-2: weight and bias, saves mean and rstd) or RMSNorm (Llama: weight, saves rstd)
    over rows of C, with the model's eps."""

    def __init__(self, kind: str, eps: float) -> None:
        if kind not in ("layernorm", "rmsnorm"):
            raise ValueError(f"unknown norm {kind!r}")
        self.layer, self.eps = kind == "layernorm", float(eps)

    def forward(self, model: Weights, ws: Workspace, tag: str, out: np.ndarray, x: np.ndarray, names: tuple) -> None:
        """out = norm(x); its statistics saved in ws under `tag` (for backward)."""
        N, C = x.shape
        rstd = ws.get(tag + ".rstd", (N,))
        if self.layer:
            fast.layernorm_forward(out, ws.get(tag + ".mean", (N,)), rstd, x, model.p[names[0]], model.p[names[1]],
                                   N, C, self.eps)
        else:
            fast.rmsnorm_forward(out, rstd, x, model.p[names[0]], N, C, self.eps)

    def backward(self, model: Weights, grads, ws: Workspace, tag: str, dx: np.ndarray, dout: np.ndarray,
                 x: np.ndarray, names: tuple) -> None:
        """dx = d norm(x) (overwritten); the norm's weight (and bias) gradients accumulated into
        grads[name] unless grads is None (frozen)."""
        N, C = x.shape
        dw = grads[names[0]] if grads is not None else None
        rstd = ws.get(tag + ".rstd", (N,))
        if self.layer:
            db = grads[names[1]] if grads is not None else None
            fast.layernorm_backward(dx, dw, db, dout, x, model.p[names[0]], ws.get(tag + ".mean", (N,)), rstd, N, C)
        else:
            fast.rmsnorm_backward(dx, dw, dout, x, model.p[names[0]], rstd, N, C)


# ----------------------------------------------------------------------------- embedding

def embed_tokens(model: Weights, name: str, out: np.ndarray, ids: np.ndarray) -> None:
    """out (N, C) = rows ids (N,) of the embedding `name`, float or kept quantized."""
    N, C = out.shape
    quantized = model.quantized.get(name)
    if quantized is None:
        weight = model.p[name]
        fast.embedding_forward(out, ids, weight, N, weight.shape[0], C)
    else:
        fast.embed_quant(out, quantized.data, quantized.ggml_type, quantized.shape[0], C, ids, N, quantized.packed)
