"""LoRA fine-tuning speed: one training step (forward, backward into rank-16 adapters on all seven
projections, AdamW on the adapters) of SmolLM2-135M (float32) in pyllm against peft + transformers
on the same weights, batch 4 x 128 tokens, the same threads, one run; and the peak memory of each
(a fresh process that loads the model and runs two steps). pyllm also trains the adapters on the
Q4_1 file's weights kept quantized (what `pyllm finetune --lora-rank` does with a GGUF model), a
second group against the same peft run (peft has no CPU 4-bit base).

Run as a script for the memory probe: python benchmarks/bench_lora.py {pyllm|pyllm-quantized|peft}.
"""

from __future__ import annotations

import os
import sys

import numpy as np

import memory_probe

THREADS = int(os.environ.get("PYLLM_BENCH_THREADS", "2"))
B, T, RANK = 4, 128, 16
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _batch(vocab):
    rng = np.random.default_rng(0)
    return rng.integers(0, vocab, (B, T)), rng.integers(0, vocab, (B, T))


def _model(dequantize: bool = True):
    from pyllm.hub import smollm2_gguf
    from pyllm.llm import load_gguf

    return load_gguf(smollm2_gguf(quiet=True), dequantize=dequantize)[0]


def pyllm_step(quantized: bool = False):
    from pyllm import kernels
    from pyllm.lora import LoRA, LoRAConfig
    from pyllm.optim import AdamW

    kernels.set_num_threads(THREADS)
    model = _model(dequantize=not quantized)
    model.int8_activations = False     # as pyllm.finetune trains: exact gradients
    model.lora = LoRA(model, LoRAConfig(rank=RANK, alpha=32.0))
    opt = AdamW(model.lora, lr=1e-3, weight_decay=0.0)
    ids, targets = _batch(model.config.vocab_size)

    def step():
        model.lora.zero_grad()
        loss = model.forward_backward(ids, targets)
        opt.step()
        return loss
    return step


def peft_step():
    import peft
    import torch
    import transformers

    from pyllm.io.hf import config_to_hf

    torch.set_num_threads(THREADS)
    model = _model()
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config_to_hf(model.config)))
    base.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in model.state_dict().items()}, strict=False)
    base.tie_weights()
    vocab = model.config.vocab_size
    del model
    twin = peft.get_peft_model(base, peft.LoraConfig(r=RANK, lora_alpha=32, target_modules=TARGETS,
                                                     lora_dropout=0.0, bias="none"))
    opt = torch.optim.AdamW([p for p in twin.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    ids, targets = (torch.from_numpy(a) for a in _batch(vocab))

    def step():
        opt.zero_grad(set_to_none=True)
        logits = twin(ids).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1))
        loss.backward()
        opt.step()
        return loss.item()
    return step


def peak_memory_mb(*args: str) -> float:
    return memory_probe.peak_memory_mb(__file__, *args, threads=THREADS)


try:
    import pytest
except ImportError:
    pytest = None

if pytest is not None:
    GROUPS = {"float": f"SmolLM2 LoRA r={RANK} step, {B}x{T} tokens vs peft",
              "quantized": f"SmolLM2 LoRA r={RANK} step on the Q4_1 weights kept quantized, {B}x{T} tokens "
                           f"vs peft (float32 base)"}

    @pytest.mark.parametrize("impl,base", [("pyllm", "float"), ("peft", "float"), ("pyllm", "quantized"),
                                           ("peft", "quantized")])
    def test_lora_step(benchmark, impl, base):
        if impl == "peft":
            pytest.importorskip("peft")
        step = pyllm_step(base == "quantized") if impl == "pyllm" else peft_step()
        benchmark.group = GROUPS[base]
        probe = "pyllm-quantized" if impl == "pyllm" and base == "quantized" else impl
        benchmark.extra_info.update(impl=impl, tokens=B * T, target=1.5, peak_mb=peak_memory_mb(probe))
        loss = benchmark.pedantic(step, rounds=3, iterations=1, warmup_rounds=1)
        assert np.isfinite(loss)


if __name__ == "__main__":
    step = peft_step() if sys.argv[1] == "peft" else pyllm_step(sys.argv[1] == "pyllm-quantized")
    step()
    step()
    memory_probe.report()
