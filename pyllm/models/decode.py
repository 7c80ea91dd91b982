"""The decode step's plan: a model described to the C++ step (csrc/model/step.h) once, so that each
new token runs through every layer with no Python between the kernels.

The plan points at the model's own arrays (the flat parameter buffer's views, the quantized blocks,
the LoRA adapters' buffers); it is rebuilt when what it points at changes (adapters attached or
removed, int8 activations switched). Not the arithmetic: the C++ step runs the same kernels, in
the same order, as the block skeleton in blocks.py.
"""

from __future__ import annotations

from typing import Optional

from pyllm import kernels
from pyllm.models.blocks import Architecture, Runner
from pyllm.models.layers import Projection, Weights


def _matrix(model: Weights, name: str, out: int, inp: int, col: int = 0, in_out: bool = False,
            weight=None) -> tuple:
    quantized = model.quantized.get(name)
    if quantized is not None:
        return None, False, quantized.data, quantized.ggml_type, out, inp, col, quantized.packed
    return (model.p[name] if weight is None else weight), in_out, None, 0, out, inp, col, False


def _linear(model: Weights, proj: Projection) -> tuple:
    if proj.weight in model.quantized:
        parts = [_matrix(model, proj.weight, proj.out, proj.inp)]
    elif proj.parts and proj.parts[0][0] in model.quantized:   # fused parts in different quantized types
        parts = [_matrix(model, name, cols.stop - cols.start, proj.inp, cols.start) for name, cols in proj.parts]
    else:
        parts = [_matrix(model, proj.weight, proj.out, proj.inp, in_out=proj.in_out, weight=model.float_weight(proj))]
    adapters = []
    lora = model.lora
    if lora is not None:
        for site, cols in proj.sites:
            if site in lora.sites:
                width = lora.B[site].shape[0]
                adapters.append((lora.A[site], lora.B[site], lora.config.rank, width,
                                 0 if cols is None else cols.start, float(lora.scale)))
    return proj.inp, proj.out, parts, model.bias(proj), adapters


def build_plan(model: Weights, runner: Runner, arch: Architecture) -> "kernels.DecodePlan":
    """The C++ decode plan of `model` as it is now."""
    cfg = runner.cfg
    positions = model.p[arch.positions] if arch.positions is not None else None
    plan = kernels.DecodePlan(arch.step, cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.head_size, cfg.vocab_size,
                              cfg.block_size, cfg.norm_eps, bool(model.int8_activations))
    plan.set_options(arch.activation, arch.embed_scale(cfg.n_embd), float(runner.query_scale),
                     float(runner.softcap or 0.0))
    plan.set_embedding(_matrix(model, arch.embedding, cfg.vocab_size, cfg.n_embd), positions)
    plan.set_head(model.p[arch.final_norm[0]], _param(model, arch.final_norm[1]), _linear(model, runner.head))
    for layer in runner.layers:
        q_norm, k_norm = (model.p[name] for name in layer.qk_norm) if layer.qk_norm else (None, None)
        plan.add_layer(model.p[layer.norm1[0]], _param(model, layer.norm1[1]), _linear(model, layer.qkv),
                       _linear(model, layer.o), model.p[layer.norm2[0]], _param(model, layer.norm2[1]),
                       [_linear(model, proj) for proj in layer.mlp], q_norm, k_norm,
                       *((model.p[name] for name in layer.post_norms) if layer.post_norms else (None, None)),
                       layer.window, layer.local_rope)
    return plan


def _param(model: Weights, name: Optional[str]):
    return None if name is None else model.p[name]
