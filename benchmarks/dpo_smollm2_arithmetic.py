"""A real preference-tuning run, reported in the README: SmolLM2-135M-Instruct (float32) tuned with DPO
and LoRA adapters on generated arithmetic pairs (the right answer chosen, a near miss rejected);
preference accuracy on held-out pairs before and after. Run as a script (a few minutes on 2 cores).

    python benchmarks/dpo_smollm2_arithmetic.py
"""
import json
import os
import tempfile
import time

from pyllm import finetune as F
from pyllm.hub import smollm2_gguf
from pyllm.io.gguf_model import load_gguf
from pyllm.llm import LLM

model, tok, template, eos = load_gguf(smollm2_gguf(), dequantize=True)
llm = LLM(model, tok, template, [eos])
path = os.path.join(tempfile.mkdtemp(), "prefs.jsonl")
with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in F.arithmetic_preferences(160, seed=1))
held_path = os.path.join(tempfile.mkdtemp(), "held.jsonl")
with open(held_path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in F.arithmetic_preferences(40, seed=2))
train, held = F.read_pairs(path, llm), F.read_pairs(held_path, llm)
print(f"held-out preference accuracy before: {F.preference_accuracy(model, held):.1%}", flush=True)
t = time.time()
log = F.dpo(llm, train, F.SFTConfig(epochs=1, batch_size=8, lr=3e-4, warmup_steps=2, lora_rank=16), beta=0.1,
            progress=False)
print(f"{len(log)} steps in {time.time() - t:.0f}s; last step loss {log[-1]['loss']}, "
      f"reward margin {log[-1]['reward_margin']}, accuracy {log[-1]['accuracy']}", flush=True)
model.lora.merge_into(model)
model.lora = None
print(f"held-out preference accuracy after: {F.preference_accuracy(model, held):.1%}", flush=True)
