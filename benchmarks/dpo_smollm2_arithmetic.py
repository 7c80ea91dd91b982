"""A real preference-tuning run, reported in the README: SmolLM2-135M-Instruct tuned with DPO and LoRA
adapters on arithmetic questions, the right answer chosen; preference accuracy on held-out pairs
before and after, and the share of held-out questions the model then answers right. Run as a
script (5 to 10 minutes on 2 cores).

    python benchmarks/dpo_smollm2_arithmetic.py                   # rejected: the model's own greedy replies
    python benchmarks/dpo_smollm2_arithmetic.py --rejected near-miss   # rejected: the right answer +-1, 2 or 10

The model's own replies (on-policy negatives, as preference data is usually collected) are what it
prefers before tuning; a near miss is a wrong number it already finds less likely than the right one.
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
from pathlib import Path

from pyllm import finetune as F
from pyllm.hub import smollm2_gguf
from pyllm.llm import load_gguf
from pyllm.llm import LLM


def own_reply_pairs(llm, n: int, seed: int) -> list[dict]:
    """Questions with the right answer chosen and the model's greedy reply rejected (questions it
    already answers right are left out)."""
    pairs = []
    for record in F.arithmetic_examples(n, seed):
        question, answer = (m["content"] for m in record["messages"])
        reply = llm.chat(record["messages"][:1], 32, temperature=0).strip()
        if reply and answer.rstrip(".").split()[-1] not in re.findall(r"-?\d+", reply):
            pairs.append({"prompt": question, "chosen": answer, "rejected": reply})
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rejected", choices=["own", "near-miss"], default="own")
    parser.add_argument("--pairs", type=int, default=160, help="training questions (default 160)")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    args = parser.parse_args()
    model, tok, template, eos = load_gguf(smollm2_gguf(), dequantize=False)
    llm = LLM(model, tok, template, [eos])
    held_questions = F.arithmetic_examples(40, seed=2)
    start = time.time()
    if args.rejected == "own":
        train_records, held_records = own_reply_pairs(llm, args.pairs, 1), own_reply_pairs(llm, 40, 2)
    else:
        train_records, held_records = F.arithmetic_preferences(args.pairs, 1), F.arithmetic_preferences(40, 2)
    print(f"{len(train_records)} training and {len(held_records)} held-out pairs ({args.rejected}; "
          f"{time.time() - start:.0f} s)", flush=True)
    folder = Path(tempfile.mkdtemp())
    F.write_jsonl(folder / "train.jsonl", train_records)
    F.write_jsonl(folder / "held.jsonl", held_records)
    train, held = F.read_pairs(folder / "train.jsonl", llm), F.read_pairs(folder / "held.jsonl", llm)
    print(f"before: held-out preference accuracy {F.preference_accuracy(model, held):.1%}, "
          f"held-out questions answered right {F.answer_accuracy(llm, held_questions):.1%}", flush=True)
    start = time.time()
    config = F.SFTConfig(epochs=args.epochs, batch_size=8, lr=args.lr, warmup_steps=2, lora_rank=16)
    log = F.dpo(llm, train, config, beta=args.beta, progress=False)
    print(f"{len(log)} steps in {time.time() - start:.0f} s; last step loss {log[-1]['loss']}, "
          f"reward margin {log[-1]['reward_margin']}, accuracy {log[-1]['accuracy']}", flush=True)
    print(f"after: held-out preference accuracy {F.preference_accuracy(model, held):.1%}, "
          f"held-out questions answered right {F.answer_accuracy(llm, held_questions):.1%}", flush=True)
    print(llm.chat([{"role": "user", "content": "What is 17 times 23?"}], 32, temperature=0))


if __name__ == "__main__":
    main()
