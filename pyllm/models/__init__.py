"""The model layer: configs, parameters in flat buffers, the KV cache, the shared layers and block,
and one file per architecture (gpt2.py, llama.py). Imports only pyllm.kernels; knows no files.

    config.py       ModelConfig
    params.py       ParamSpec, QuantizedWeight, the flat-buffer views
    cache.py        KVCache
    layers.py       linear (float / transposed / quantized / fused / LoRA), norms, embedding
    workspace.py    activation buffers reused across steps
    blocks.py       the block skeleton: training forward, backward, cached decode step
    gpt2.py         GPT-2's own pieces       llama.py   Llama's own pieces
    qwen.py         Qwen2's and Qwen3's      gemma.py   Gemma 3's
    transformer.py  Transformer: parameters + checks + the three ways to run
"""

from pyllm.models.cache import KVCache
from pyllm.models.config import ARCHITECTURES, ModelConfig
from pyllm.models.params import ParamSpec, QuantizedWeight
from pyllm.models.transformer import (IGNORE, STEP_OPERATIONS, Inspection, Transformer, hf_norm_offsets,
                                      parameter_specs, stored_in_out)

__all__ = ["ARCHITECTURES", "IGNORE", "Inspection", "KVCache", "ModelConfig", "ParamSpec", "QuantizedWeight",
           "STEP_OPERATIONS", "Transformer", "hf_norm_offsets", "parameter_specs", "stored_in_out"]
