"""The Llama family: RMSNorm, rotary position embeddings, grouped-query attention, a SwiGLU MLP, no
biases, weights stored (out, in) as Hugging Face's LlamaForCausalLM does (so x @ W^T).

q_proj, k_proj and v_proj sit next to each other in the flat parameter buffer, so the three run
as one product over their concatenation (a fused quantized block for a GGUF model).
Not the block skeleton (blocks.py); this file holds only what is Llama's own.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from pyllm.kernels import unchecked as fast
from pyllm.models.blocks import Architecture
from pyllm.models.config import ModelConfig
from pyllm.models.layers import Layer, Projection, Weights, embed_tokens, linear, linear_backward
from pyllm.models.params import ParamSpec
from pyllm.models.workspace import Workspace

EMBED = "model.embed_tokens.weight"


def qkv_name(i: int) -> str:
    """The fused q, k, v projection of layer i (not a parameter: its parts are)."""
    return f"model.layers.{i}.self_attn.qkv"


def qkv_bias_name(i: int) -> str:
    """The fused bias of q, k and v of layer i (not a parameter: q_proj.bias, k_proj.bias and
    v_proj.bias are), for the families that have them."""
    return f"model.layers.{i}.self_attn.qkv.bias"


class Llama(Architecture):
    name = "llama"
    norm = "rmsnorm"
    rotary = True
    embedding = EMBED
    final_norm = ("model.norm.weight", None)
    norm2_name = "post_attention_layernorm.weight"   # the norm before the feed-forward
    qkv_bias = False     # biases on q, k and v (Qwen2)
    qk_norm = False      # an RMSNorm over each q and k head before rope (Qwen3)

    def post_norm_names(self, prefix: str) -> Optional[tuple]:
        """The norms after attention and after the feed-forward of the layer named prefix, if any."""
        return None

    def parameter_specs(self, cfg: ModelConfig) -> list[ParamSpec]:
        C, F, HS = cfg.n_embd, cfg.intermediate_size, cfg.head_size
        q_out, kv_out = cfg.n_head * HS, cfg.n_kv_head * HS
        decayed, other = [], [ParamSpec(EMBED, (cfg.vocab_size, C), False, "normal")]
        for i in range(cfg.n_layer):
            h = f"model.layers.{i}."
            decayed += [ParamSpec(h + "self_attn.q_proj.weight", (q_out, C), True, "normal"),
                        ParamSpec(h + "self_attn.k_proj.weight", (kv_out, C), True, "normal"),
                        ParamSpec(h + "self_attn.v_proj.weight", (kv_out, C), True, "normal"),
                        ParamSpec(h + "self_attn.o_proj.weight", (C, q_out), True, "residual"),
                        ParamSpec(h + "mlp.gate_proj.weight", (F, C), True, "normal"),
                        ParamSpec(h + "mlp.up_proj.weight", (F, C), True, "normal"),
                        ParamSpec(h + "mlp.down_proj.weight", (C, F), True, "residual")]
            if self.qkv_bias:   # adjacent, in q, k, v order: one fused bias over the three
                other += [ParamSpec(h + f"self_attn.{x}_proj.bias", (n,), False, "zeros")
                          for x, n in (("q", q_out), ("k", kv_out), ("v", kv_out))]
            if self.qk_norm:
                other += [ParamSpec(h + f"self_attn.{x}_norm.weight", (HS,), False, "ones") for x in "qk"]
            other += [ParamSpec(h + "input_layernorm.weight", (C,), False, "ones"),
                      ParamSpec(h + self.norm2_name, (C,), False, "ones")]
            other += [ParamSpec(name, (C,), False, "ones") for name in self.post_norm_names(h) or ()]
        other.append(ParamSpec(self.final_norm[0], (C,), False, "ones"))
        if not cfg.tie_word_embeddings:
            decayed.append(ParamSpec("lm_head.weight", (cfg.vocab_size, C), True, "normal"))
        return decayed + other

    def layers(self, cfg: ModelConfig) -> list[Layer]:
        C, F, HS = cfg.n_embd, cfg.intermediate_size, cfg.head_size
        nq, nkv = cfg.n_head * HS, cfg.n_kv_head * HS
        out = []
        for i in range(cfg.n_layer):
            h = f"model.layers.{i}."
            parts = ((h + "self_attn.q_proj.weight", slice(0, nq)),
                     (h + "self_attn.k_proj.weight", slice(nq, nq + nkv)),
                     (h + "self_attn.v_proj.weight", slice(nq + nkv, nq + 2 * nkv)))
            bias, bias_parts = None, ()
            if self.qkv_bias:
                bias = qkv_bias_name(i)
                bias_parts = tuple(h + f"self_attn.{x}_proj.bias" for x in "qkv")
            qk_norm = (h + "self_attn.q_norm.weight", h + "self_attn.k_norm.weight") if self.qk_norm else None
            out.append(Layer(norm1=(h + "input_layernorm.weight", None),
                             qkv=Projection(qkv_name(i), C, nq + 2 * nkv, bias, parts=parts, bias_parts=bias_parts),
                             o=Projection(h + "self_attn.o_proj.weight", nq, C),
                             norm2=(h + self.norm2_name, None),
                             mlp=(Projection(h + "mlp.gate_proj.weight", C, F), Projection(h + "mlp.up_proj.weight", C, F),
                                  Projection(h + "mlp.down_proj.weight", F, C)), qk_norm=qk_norm,
                             post_norms=self.post_norm_names(h), window=cfg.layer_window(i),
                             local_rope=cfg.layer_is_local(i)))
        return out

    def embed(self, model: Weights, out: np.ndarray, ids: np.ndarray) -> None:
        embed_tokens(model, EMBED, out, ids.reshape(-1))

    def embed_backward(self, model: Weights, grads, dx: np.ndarray, ids: np.ndarray) -> None:
        V, C = grads[EMBED].shape
        fast.embedding_backward(grads[EMBED], dx, ids, ids.size, V, C)

    def mlp_forward(self, model: Weights, layer: Layer, ws: Workspace, tag: str, x: np.ndarray,
                    out: np.ndarray) -> None:
        gate_proj, up_proj, down_proj = layer.mlp
        shape = (x.shape[0], gate_proj.out)
        gate = ws.get(f"gate.{tag}", shape)
        up = ws.get(f"up.{tag}", shape)
        linear(model, gate_proj, gate, x)
        linear(model, up_proj, up, x)
        act = ws.get(f"act.{tag}", shape)
        (fast.geglu_forward if self.activation == "geglu" else fast.swiglu_forward)(act, gate, up)
        linear(model, down_proj, out, act)

    def mlp_backward(self, model: Weights, layer: Layer, ws: Workspace, tag: str, dx: np.ndarray,
                     dout: np.ndarray, x: np.ndarray) -> None:
        gate_proj, up_proj, down_proj = layer.mlp
        shape = (x.shape[0], gate_proj.out)
        act = ws.get(f"act.{tag}", shape)
        dact = ws.get("dact", shape)
        linear_backward(model, down_proj, dact, dout, act)
        dgate, dup = ws.get("dgate", shape), ws.get("dup", shape)
        (fast.geglu_backward if self.activation == "geglu" else fast.swiglu_backward)(
            dgate, dup, dact, ws.get(f"gate.{tag}", shape), ws.get(f"up.{tag}", shape))
        linear_backward(model, gate_proj, dx, dgate, x)
        dtmp = ws.get("dmlp", dx.shape)
        linear_backward(model, up_proj, dtmp, dup, x)
        dx += dtmp
