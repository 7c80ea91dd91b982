"""A real fine-tuning run, reported in the README: SmolLM2-135M-Instruct fine-tuned on 240 generated
arithmetic question/answer pairs, accuracy on 40 held-out questions before and after. Not a pytest
benchmark: run it as a script (3 to 5 minutes on 2 cores).

    python benchmarks/sft_smollm2_arithmetic.py                         # all parameters (float32), lr 5e-5
    python benchmarks/sft_smollm2_arithmetic.py --lora 16               # LoRA rank 16 on the float32 base, lr 2e-3
    python benchmarks/sft_smollm2_arithmetic.py --lora 16 --quantized   # LoRA on the Q4_1 weights kept quantized
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from pyllm import finetune as F
from pyllm.hub import smollm2_gguf
from pyllm.llm import load_gguf
from pyllm.llm import LLM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lora", type=int, default=0, help="LoRA rank (0: fine-tune all parameters)")
    parser.add_argument("--quantized", action="store_true", help="keep the GGUF weights quantized (needs --lora)")
    args = parser.parse_args()
    if args.quantized and not args.lora:
        parser.error("--quantized trains LoRA adapters: give --lora")
    model, tok, template, eos = load_gguf(smollm2_gguf(), dequantize=not args.quantized)
    llm = LLM(model, tok, template, [eos])
    print(model, flush=True)
    path = Path(tempfile.mkdtemp()) / "arith_train.jsonl"
    F.write_jsonl(path, F.arithmetic_examples(240, seed=1))
    held_out = F.arithmetic_examples(40, seed=2)
    examples = F.read_examples(path, llm)
    val = [F._example(r, llm, i) for i, r in enumerate(held_out)]
    start = time.time()
    print(f"held-out accuracy before: {F.answer_accuracy(llm, held_out):.1%} ({time.time() - start:.0f} s); "
          f"held-out answer loss {F.masked_loss(llm.model, val):.3f}", flush=True)
    config = F.SFTConfig(epochs=2, batch_size=8, lr=2e-3 if args.lora else 5e-5, warmup_steps=5, lora_rank=args.lora)
    start = time.time()
    log = F.sft(llm, examples, val, config, progress=False)
    print(f"trained {len(log)} steps in {time.time() - start:.0f} s; held-out answer loss {log[-1]['val_loss']:.3f}",
          flush=True)
    print(f"held-out accuracy after: {F.answer_accuracy(llm, held_out):.1%}", flush=True)
    print(llm.chat([{"role": "user", "content": "What is 17 times 23?"}], 24, temperature=0))


if __name__ == "__main__":
    main()
