"""A real fine-tuning run, reported in the README: SmolLM2-135M-Instruct (expanded to float32, all
parameters) fine-tuned on 240 generated arithmetic question/answer pairs, accuracy on 40 held-out
questions before and after. Not a pytest benchmark: run it as a script (about 5 minutes on 2 cores).

    python benchmarks/sft_smollm2_arithmetic.py             # all parameters, lr 5e-5
    python benchmarks/sft_smollm2_arithmetic.py --lora 16   # LoRA adapters of rank 16, lr 2e-3
"""
import argparse, json, time
from pyllm import finetune as F
from pyllm.io.gguf_model import load_gguf
from pyllm.llm import LLM
from pyllm.hub import smollm2_gguf

args = argparse.ArgumentParser()
args.add_argument("--lora", type=int, default=0, help="LoRA rank (0: fine-tune all parameters)")
args = args.parse_args()
model, tok, template, eos = load_gguf(smollm2_gguf(), dequantize=True)
llm = LLM(model, tok, template, [eos])
train_records = F.arithmetic_examples(240, seed=1)
held_out = F.arithmetic_examples(40, seed=2)
import tempfile, os
path = os.path.join(tempfile.mkdtemp(), "arith_train.jsonl")
with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in train_records)
examples = F.read_examples(path, llm)
t = time.time(); before = F.answer_accuracy(llm, held_out); print(f"held-out accuracy before: {before:.2%} ({time.time()-t:.0f}s)", flush=True)
val = [F._example(r, llm, i) for i, r in enumerate(held_out)]
print("val loss before", F.masked_loss(model, val), flush=True)
t = time.time()
config = F.SFTConfig(epochs=2, batch_size=8, lr=2e-3 if args.lora else 5e-5, warmup_steps=5, lora_rank=args.lora)
log = F.sft(llm, examples, val, config, progress=False)
print(f"trained {len(log)} steps in {time.time()-t:.0f}s; val loss after {log[-1]['val_loss']}", flush=True)
after = F.answer_accuracy(llm, held_out); print(f"held-out accuracy after: {after:.2%}", flush=True)
print(llm.chat([{"role": "user", "content": "What is 17 times 23?"}], 24, temperature=0))
