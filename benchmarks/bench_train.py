"""Training throughput: one step (forward + backward + AdamW with clipping) of pyllm.Model against a
PyTorch twin of the same GPT-2 model, both fp32 on the same threads, in one run; and peak memory.

The twin is written the way PyTorch is used at its best on a CPU: scaled_dot_product_attention,
tanh GELU, the tied head, torch.optim.AdamW (foreach) and clip_grad_norm_. Peak memory is the
peak resident set of a fresh process that builds the model and runs two steps (interpreter and
libraries included, as a user would see it).

Run as a script for the memory probe: python benchmarks/bench_train.py {pyllm|torch} SHAPE.
"""

from __future__ import annotations

import os
import sys

import numpy as np

import memory_probe

# name -> (n_layer, n_head, n_embd, block_size, batch, vocab)
SHAPES = {
    "6x384": (6, 6, 384, 256, 8, 50304),
    "gpt2-124M": (12, 12, 768, 1024, 1, 50304),
}
THREADS = int(os.environ.get("PYLLM_BENCH_THREADS", "2"))


def training_flops(shape: str) -> float:
    """FLOPs of one step: 6 per parameter-token in the matmuls, plus causal attention (fwd + bwd)."""
    L, H, C, T, B, V = SHAPES[shape]
    matmul_params = L * 12 * C * C + V * C
    attention = L * 4 * T * C / 2 * 3   # q k^T and p v, half the positions, forward + 2x backward
    return B * T * (6 * matmul_params + 2 * attention)


def batch(shape: str):
    L, H, C, T, B, V = SHAPES[shape]
    rng = np.random.default_rng(0)
    return rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))


def pyllm_step(shape: str):
    from pyllm import kernels
    from pyllm.model import Model, ModelConfig
    from pyllm.optim import AdamW

    kernels.set_num_threads(THREADS)
    L, H, C, T, B, V = SHAPES[shape]
    model = Model(ModelConfig(vocab_size=V, block_size=T, n_layer=L, n_head=H, n_embd=C))
    opt = AdamW(model, lr=1e-4, weight_decay=0.1, grad_clip=1.0)
    ids, targets = batch(shape)

    def step() -> float:
        model.zero_grad()
        loss = model.forward_backward(ids, targets)
        opt.step()
        return loss
    return step


def torch_step(shape: str):
    import torch
    import torch.nn.functional as F
    from torch import nn

    torch.set_num_threads(THREADS)
    L, H, C, T, B, V = SHAPES[shape]

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.ln_2 = nn.LayerNorm(C), nn.LayerNorm(C)
            self.c_attn, self.attn_proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
            self.c_fc, self.mlp_proj = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)

        def forward(self, x):
            b, t, _ = x.shape
            q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
            q, k, v = (z.view(b, t, H, C // H).transpose(1, 2) for z in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.attn_proj(y.transpose(1, 2).reshape(b, t, C))
            return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe = nn.Embedding(V, C), nn.Embedding(T, C)
            self.blocks = nn.ModuleList(Block() for _ in range(L))
            self.ln_f = nn.LayerNorm(C)

        def forward(self, idx, targets):
            x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
            for block in self.blocks:
                x = block(x)
            logits = self.ln_f(x) @ self.wte.weight.T
            return F.cross_entropy(logits.view(-1, V), targets.view(-1))

    torch.manual_seed(0)
    model = GPT()
    for name, p in model.named_parameters():   # GPT-2's initialisation, as pyllm.Model's
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.02)
        elif name.endswith("bias"):
            torch.nn.init.zeros_(p)
    decay = [p for p in model.parameters() if p.dim() == 2 and p is not model.wte.weight and p is not model.wpe.weight]
    other = [p for p in model.parameters() if not any(p is d for d in decay)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=1e-4, betas=(0.9, 0.95))
    ids, targets = (torch.from_numpy(a) for a in batch(shape))

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = model(ids, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.item()
    return step


def peak_memory_mb(*args: str) -> float:
    return memory_probe.peak_memory_mb(__file__, *args, threads=THREADS)


try:
    import pytest
except ImportError:  # the memory probe runs without pytest
    pytest = None

if pytest is not None:
    @pytest.mark.parametrize("impl", ["pyllm", "torch"])
    @pytest.mark.parametrize("shape", list(SHAPES))
    def test_train_step(benchmark, shape, impl):
        if impl == "torch":
            pytest.importorskip("torch")
        L, H, C, T, B, V = SHAPES[shape]
        step = pyllm_step(shape) if impl == "pyllm" else torch_step(shape)
        benchmark.group = f"train step {shape} (B={B}, T={T}, V={V}) vs torch"
        benchmark.extra_info.update(impl=impl, target=1.0, tokens=B * T, peak_mb=peak_memory_mb(impl, shape))
        rounds = 5 if shape == "6x384" else 3
        loss = benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=1)
        benchmark.extra_info["gflops"] = training_flops(shape) / benchmark.stats.stats.median / 1e9
        assert np.isfinite(loss) and loss < np.log(V) + 1.0


    @pytest.fixture(scope="module")
    def busy_core():
        """Another process keeping one of the cores busy while training steps are timed."""
        import subprocess
        import time

        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(0.5)
        yield
        hog.kill()
        hog.wait()

    @pytest.mark.parametrize("threads", [2, 1], ids=["2 threads", "1 thread"])
    def test_train_step_with_a_busy_core(benchmark, busy_core, threads):
        """The 6x384 step with one core busy elsewhere: all threads must not be slower than one."""
        from pyllm import kernels

        L, H, C, T, B, V = SHAPES["6x384"]
        step = pyllm_step("6x384")
        benchmark.group = "train step 6x384, one core busy: 2 threads vs 1"
        benchmark.extra_info.update(impl="pyllm" if threads == 2 else "1 thread", target=1.0, tokens=B * T)
        kernels.set_num_threads(threads)
        try:
            loss = benchmark.pedantic(step, rounds=5, iterations=1, warmup_rounds=1)
        finally:
            kernels.set_num_threads(THREADS)
        assert np.isfinite(loss)


if __name__ == "__main__":
    impl, shape = sys.argv[1], sys.argv[2]
    step = pyllm_step(shape) if impl == "pyllm" else torch_step(shape)
    for _ in range(2):
        step()
    memory_probe.report()
