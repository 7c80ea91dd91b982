"""GPT-2: LayerNorm with biases, learned position embeddings, a GELU (tanh) MLP, biases on every
projection, and Hugging Face's Conv1D layout: weights stored (in, out), so x @ W.

What GPT2LMHeadModel names and shapes its parameters is what state_dict() gives; a GGUF file's
(out, in) quantized weights are kept as they are (linear reads both layouts).
Not the block skeleton (blocks.py); this file holds only what is GPT-2's own.
"""

from __future__ import annotations


import numpy as np

from pyllm.kernels import unchecked as fast
from pyllm.models.blocks import Architecture
from pyllm.models.config import ModelConfig
from pyllm.models.layers import Layer, Projection, Weights, embed_tokens, linear, linear_backward
from pyllm.models.params import ParamSpec
from pyllm.models.workspace import Workspace

WTE, WPE = "transformer.wte.weight", "transformer.wpe.weight"


class GPT2(Architecture):
    name = "gpt2"
    step = "gpt2"
    norm = "layernorm"
    rotary = False
    embedding = WTE
    positions = WPE
    final_norm = ("transformer.ln_f.weight", "transformer.ln_f.bias")

    def parameter_specs(self, cfg: ModelConfig) -> list[ParamSpec]:
        C, F = cfg.n_embd, cfg.intermediate_size
        decayed, other = [], [ParamSpec(WTE, (cfg.vocab_size, C), False, "normal"),
                              ParamSpec(WPE, (cfg.block_size, C), False, "normal")]
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
        other += [ParamSpec(self.final_norm[0], (C,), False, "ones"),
                  ParamSpec(self.final_norm[1], (C,), False, "zeros")]
        if not cfg.tie_word_embeddings:
            decayed.append(ParamSpec("lm_head.weight", (cfg.vocab_size, C), True, "normal"))
        return decayed + other

    def layers(self, cfg: ModelConfig) -> list[Layer]:
        C, F = cfg.n_embd, cfg.intermediate_size
        out = []
        for i in range(cfg.n_layer):
            h = f"transformer.h.{i}."

            def conv1d(name: str, inp: int, width: int) -> Projection:
                return Projection(h + name + ".weight", inp, width, h + name + ".bias", in_out=True)

            out.append(Layer(norm1=(h + "ln_1.weight", h + "ln_1.bias"), qkv=conv1d("attn.c_attn", C, 3 * C),
                             o=conv1d("attn.c_proj", C, C), norm2=(h + "ln_2.weight", h + "ln_2.bias"),
                             mlp=(conv1d("mlp.c_fc", C, F), conv1d("mlp.c_proj", F, C))))
        return out

    def embed(self, model: Weights, out: np.ndarray, ids: np.ndarray) -> None:
        B, T = ids.shape
        embed_tokens(model, WTE, out, ids.reshape(-1))
        out.reshape(B, T, -1)[...] += model.p[WPE][:T]

    def embed_backward(self, model: Weights, grads, dx: np.ndarray, ids: np.ndarray) -> None:
        B, T = ids.shape
        grads[WPE][:T] += dx.reshape(B, T, -1).sum(axis=0)
        V, C = grads[WTE].shape
        fast.embedding_backward(grads[WTE], dx, ids, B * T, V, C)

    def mlp_forward(self, model: Weights, layer: Layer, ws: Workspace, tag: str, x: np.ndarray,
                    out: np.ndarray) -> None:
        fc_proj, out_proj = layer.mlp
        N = x.shape[0]
        fc = ws.get(f"fc.{tag}", (N, fc_proj.out))
        linear(model, fc_proj, fc, x)
        act = ws.get(f"gelu.{tag}", fc.shape)
        fast.gelu_forward(act, fc)
        linear(model, out_proj, out, act)

    def mlp_backward(self, model: Weights, layer: Layer, ws: Workspace, tag: str, dx: np.ndarray,
                     dout: np.ndarray, x: np.ndarray) -> None:
        fc_proj, out_proj = layer.mlp
        N = x.shape[0]
        fc, act = ws.get(f"fc.{tag}", (N, fc_proj.out)), ws.get(f"gelu.{tag}", (N, fc_proj.out))
        dact = ws.get("dact", act.shape)
        linear_backward(model, out_proj, dact, dout, act)
        dfc = ws.get("dfc", act.shape)
        fast.gelu_backward(dfc, dact, fc)
        linear_backward(model, fc_proj, dx, dfc, x)
