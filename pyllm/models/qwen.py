"""The Qwen families, as Llama with one addition each: Qwen2 (and Qwen2.5) put biases on the q, k
and v projections; Qwen3 puts an RMSNorm (a weight per head dimension, shared by the heads) on each
query and key head before the rotary embedding, and may set head_dim apart from n_embd / n_head.
Hugging Face's Qwen2ForCausalLM and Qwen3ForCausalLM name their parameters as Llama does, plus
self_attn.{q,k,v}_proj.bias and self_attn.{q,k}_norm.weight.

Not the block (blocks.py runs the biases through the fused q/k/v product and the head norms in
both directions); this file only names what each family adds.
"""

from __future__ import annotations

from pyllm.models.llama import Llama


class Qwen2(Llama):
    name = "qwen2"
    qkv_bias = True


class Qwen3(Llama):
    name = "qwen3"
    qk_norm = True
