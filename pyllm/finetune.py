"""Fine-tuning: supervised (SFT) and preference tuning (DPO), of all weights or of LoRA adapters.

SFT examples are JSONL lines of chat `messages` (system/user/assistant) or `prompt`/`completion`
pairs. Each is formatted with the model's chat template, and only the assistant's tokens are
trained on: every other position's target is -100, which the loss ignores. Examples are padded
into batches (padding ignored too). DPO pairs are `prompt`/`chosen`/`rejected` lines, trained
against the model's own log-probabilities from before training. Float32 models only (a GGUF
model is expanded first); adapters live in pyllm.lora.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

IGNORE = -100


class DataError(ValueError):
    """A bad example, named by file and line."""


@dataclass
class Example:
    ids: np.ndarray        # the formatted conversation's tokens
    targets: np.ndarray    # next-token targets: the assistant's tokens, IGNORE elsewhere
    line: int


def read_examples(path, llm, skip_bad: bool = False, say: Callable[[str], None] = print) -> list[Example]:
    """Examples from a JSONL file, checked line by line; the first bad line stops the run (with its
    number) unless skip_bad, which drops bad lines with a notice."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such data file: {path}")
    examples, skipped = [], 0
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                examples.append(_example(json.loads(line), llm, number))
            except (json.JSONDecodeError, DataError) as exc:
                reason = f"not valid JSON ({exc.msg})" if isinstance(exc, json.JSONDecodeError) else str(exc)
                message = f"{path}:{number}: {reason}"
                if not skip_bad:
                    raise DataError(message + " (or pass --skip-bad to leave such lines out)") from None
                skipped += 1
                say(f"skipping {message}")
    if skipped:
        say(f"skipped {skipped} bad line(s) of {path}")
    if not examples:
        raise DataError(f"{path}: no usable examples")
    return examples


def _messages(record) -> list[dict]:
    if not isinstance(record, dict):
        raise DataError("each line must be a JSON object")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError('"messages" must be a non-empty list')
        for m in messages:
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                    or not isinstance(m.get("content"), str):
                raise DataError('each message needs "role" (system, user, assistant) and a "content" string')
        return messages
    if isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str):
        return [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["completion"]}]
    raise DataError('a line needs "messages", or "prompt" and "completion" strings')


def _example(record, llm, line: int) -> Example:
    """Tokens of the conversation and targets that keep only the assistant turns."""
    messages = _messages(record)
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError("no assistant turn to learn from")
    tok = llm.tokenizer
    ids: list[int] = []
    learn: list[bool] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if not m["content"].strip():
            raise DataError(f"message {i} is an empty assistant turn")
        before = tok.encode(llm.apply_chat_template(messages[:i], add_generation_prompt=True), allowed_special="all") \
            if i else []
        through = tok.encode(llm.apply_chat_template(messages[:i + 1], add_generation_prompt=False),
                             allowed_special="all")
        if before[:len(ids)] != ids or through[:len(before)] != before or len(through) <= len(before):
            raise DataError("the chat template does not extend the conversation token by token")
        # Tokens up to the reply are context; the reply (and its end-of-turn tokens) is learned.
        learn += [False] * (len(before) - len(ids)) + [True] * (len(through) - len(before))
        ids = through
    full = tok.encode(llm.apply_chat_template(messages, add_generation_prompt=False), allowed_special="all")
    if full[:len(ids)] != ids:
        raise DataError("the chat template does not extend the conversation token by token")
    learn += [False] * (len(full) - len(ids))   # turns after the last answer: context only
    ids = full
    if len(ids) > llm.context_window:
        raise DataError(f"the example has {len(ids)} tokens, longer than the {llm.context_window}-token context")
    ids_arr = np.asarray(ids, np.int64)
    targets = np.full(len(ids), IGNORE, np.int64)
    learned = np.asarray(learn, bool)
    targets[:-1] = np.where(learned[1:], ids_arr[1:], IGNORE)   # position t predicts token t + 1
    return Example(ids_arr, targets, line)


def batch(examples: list[Example]) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded (ids, targets); padding positions are ignored by the loss."""
    T = max(len(e.ids) for e in examples)
    ids = np.zeros((len(examples), T), np.int64)
    targets = np.full((len(examples), T), IGNORE, np.int64)
    for b, e in enumerate(examples):
        ids[b, :len(e.ids)] = e.ids
        targets[b, :len(e.targets)] = e.targets
    return ids, targets


def masked_loss(model, examples: list[Example]) -> float:
    """Mean cross-entropy over the assistant tokens of the examples."""
    ids, targets = batch(examples)
    return model.loss(ids, targets)


@dataclass
class SFTConfig:
    epochs: float = 3.0
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 0.0
    grad_clip: Optional[float] = 1.0
    warmup_steps: int = 10
    val_fraction: float = 0.1
    seed: int = 0
    lora_rank: int = 0          # > 0: train LoRA adapters of this rank on a frozen base
    lora_alpha: float = 16.0


def sft(llm, train: list[Example], val: list[Example], cfg: SFTConfig, out_dir=None,
        say: Callable[[str], None] = print, progress: bool = True) -> list[dict]:
    """Fine-tunes llm.model on the examples (all parameters); returns the log records."""
    from tqdm.auto import tqdm

    from pyllm.optim import AdamW, cosine_lr

    model = llm.model
    rng = np.random.default_rng(cfg.seed)
    trained = _trained_parameters(model, cfg, say)
    opt = AdamW(trained, lr=cfg.lr, weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip)
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total = max(1, int(round(cfg.epochs * steps_per_epoch)))
    records = []
    order = rng.permutation(len(train))
    start = time.perf_counter()
    with tqdm(total=total, desc="fine-tuning", unit="step", disable=not progress) as bar:
        for step in range(total):
            position = (step % steps_per_epoch) * cfg.batch_size
            if step and step % steps_per_epoch == 0:
                order = rng.permutation(len(train))
            chunk = [train[i] for i in order[position:position + cfg.batch_size]]
            ids, targets = batch(chunk)
            model.zero_grad()
            trained.grads.fill(0.0)
            loss = model.forward_backward(ids, targets)
            if not math.isfinite(loss):
                raise FloatingPointError(f"the loss is {loss} at step {step + 1}")
            opt.step(cosine_lr(step, cfg.lr, cfg.warmup_steps, total, cfg.lr / 10))
            record = {"step": step + 1, "loss": round(loss, 5), "time_s": round(time.perf_counter() - start, 2)}
            if val and (step + 1 == total or (step + 1) % max(1, total // 5) == 0):
                record["val_loss"] = round(masked_loss(model, val), 5)
            records.append(record)
            bar.set_postfix(loss=f"{loss:.3f}")
            bar.update(1)
    if out_dir is not None:
        _save(llm, out_dir, records)
    return records


def _trained_parameters(model, cfg: SFTConfig, say: Callable[[str], None]):
    """What the optimizer updates: the model itself, or LoRA adapters attached to its frozen base."""
    if model.quantized:
        raise ValueError("fine-tuning needs float32 weights: load a GGUF model with dequantize=True")
    if not cfg.lora_rank:
        return model
    from pyllm.lora import LoRA, LoRAConfig

    model.lora = LoRA(model, LoRAConfig(rank=cfg.lora_rank, alpha=cfg.lora_alpha, seed=cfg.seed))
    say(f"LoRA rank {cfg.lora_rank}: {model.lora.num_params:,} trained parameters, the base frozen")
    return model.lora


def _save(llm, out_dir, records: list[dict]) -> None:
    """The model folder (adapters merged in) and the log; adapters also on their own, in peft's format."""
    model = llm.model
    if model.lora is not None:
        model.lora.save(Path(out_dir) / "adapter")
        model.lora.merge_into(model)
        model.lora = None
    llm.save(out_dir)
    write_jsonl(Path(out_dir) / "finetune_log.jsonl", records)


def write_jsonl(path, records) -> None:
    """One JSON object per line, written atomically."""
    from pyllm.io.atomic import write_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def split(examples: list[Example], val_fraction: float, seed: int = 0) -> tuple[list[Example], list[Example]]:
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(examples))
    n_val = int(len(examples) * val_fraction) if len(examples) >= 10 else 0
    return [examples[i] for i in order[n_val:]], [examples[i] for i in order[:n_val]]


def arithmetic_examples(n: int, seed: int = 0) -> list[dict]:
    """A made-up practice set: questions about sums and products of small numbers, with answers."""
    rng = np.random.default_rng(seed)
    records = []
    for _ in range(n):
        a, b = (int(x) for x in rng.integers(2, 50, 2))
        if rng.random() < 0.5:
            q, ans = f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
        else:
            q, ans = f"What is {a} times {b}?", f"{a} times {b} is {a * b}."
        records.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": ans}]})
    return records


def answer_accuracy(llm, records: list[dict], max_new_tokens: int = 24) -> float:
    """Share of conversations whose greedy reply to the last user turn contains the reference
    answer's final number (for the generated arithmetic set)."""
    import re

    hits = 0
    for record in records:
        messages = _messages(record)
        expected = re.findall(r"-?\d+", messages[-1]["content"])[-1]
        reply = llm.chat(messages[:-1], max_new_tokens, temperature=0)
        hits += expected in re.findall(r"-?\d+", reply)
    return hits / max(1, len(records))


# ----------------------------------------------------------------------------- preference tuning (DPO)

@dataclass
class Pair:
    chosen: Example
    rejected: Example
    line: int


def read_pairs(path, llm, skip_bad: bool = False, say: Callable[[str], None] = print) -> list[Pair]:
    """Preference pairs from JSONL lines of "prompt", "chosen" and "rejected" strings."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such data file: {path}")
    pairs = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or not all(isinstance(record.get(k), str)
                                                           for k in ("prompt", "chosen", "rejected")):
                    raise DataError('a line needs "prompt", "chosen" and "rejected" strings')
                make = lambda answer: _example({"prompt": record["prompt"], "completion": answer}, llm, number)
                pairs.append(Pair(make(record["chosen"]), make(record["rejected"]), number))
            except (json.JSONDecodeError, DataError) as exc:
                reason = f"not valid JSON ({exc.msg})" if isinstance(exc, json.JSONDecodeError) else str(exc)
                if not skip_bad:
                    raise DataError(f"{path}:{number}: {reason} (or pass --skip-bad to leave such lines out)") from None
                say(f"skipping {path}:{number}: {reason}")
    if not pairs:
        raise DataError(f"{path}: no usable preference pairs")
    return pairs


def sequence_logprob(model, example: Example) -> float:
    """log p(answer | prompt): the sum over the learned tokens of their log-probabilities."""
    count = int(np.count_nonzero(example.targets != IGNORE))
    return -model.loss(example.ids[None, :], example.targets[None, :]) * count


def dpo_loss(policy_chosen: float, policy_rejected: float, ref_chosen: float, ref_rejected: float,
             beta: float) -> tuple[float, float]:
    """(-log sigmoid(beta * margin), sigmoid(-beta * margin)) with margin the policy's log-ratio
    gain of chosen over rejected relative to the reference."""
    z = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    return float(np.logaddexp(0.0, -z)), float(1.0 / (1.0 + np.exp(z)))


def dpo_forward_backward(model, pair: Pair, ref: tuple[float, float], beta: float, scale: float = 1.0) -> dict:
    """The DPO loss of one pair; adds scale * its gradient into the trained parameters' gradients.

    d loss / d logp(chosen) = -beta * sigmoid(-z) and the opposite for rejected, so each side is a
    masked cross-entropy backward (whose loss is -logp / count) weighted by +-beta sigmoid(-z) count.
    """
    chosen, rejected = sequence_logprob(model, pair.chosen), sequence_logprob(model, pair.rejected)
    loss, weight = dpo_loss(chosen, rejected, ref[0], ref[1], beta)
    for example, sign in ((pair.chosen, 1.0), (pair.rejected, -1.0)):
        count = int(np.count_nonzero(example.targets != IGNORE))
        model.forward_backward(example.ids[None, :], example.targets[None, :],
                               loss_scale=sign * scale * beta * weight * count)
    margin = (chosen - ref[0]) - (rejected - ref[1])
    return {"loss": loss, "margin": margin, "correct": margin > 0}


def reference_logprobs(model, pairs: list[Pair]) -> list[tuple[float, float]]:
    """The frozen reference: log-probabilities of every pair under the model before training."""
    return [(sequence_logprob(model, p.chosen), sequence_logprob(model, p.rejected)) for p in pairs]


def preference_accuracy(model, pairs: list[Pair]) -> float:
    """Share of pairs whose chosen answer the model finds likelier than the rejected one."""
    return float(np.mean([sequence_logprob(model, p.chosen) > sequence_logprob(model, p.rejected) for p in pairs]))


def dpo(llm, train: list[Pair], cfg: SFTConfig, beta: float = 0.1, out_dir=None,
        say: Callable[[str], None] = print, progress: bool = True) -> list[dict]:
    """DPO against the model as it was before training (reference log-probs computed once)."""
    from tqdm.auto import tqdm

    from pyllm.optim import AdamW, cosine_lr

    model = llm.model
    if model.quantized:
        raise ValueError("fine-tuning needs float32 weights: load a GGUF model with dequantize=True")
    refs = reference_logprobs(model, train)
    trained = _trained_parameters(model, cfg, say)
    opt = AdamW(trained, lr=cfg.lr, weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip)
    rng = np.random.default_rng(cfg.seed)
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total = max(1, int(round(cfg.epochs * steps_per_epoch)))
    records, order = [], rng.permutation(len(train))
    with tqdm(total=total, desc="dpo", unit="step", disable=not progress) as bar:
        for step in range(total):
            if step and step % steps_per_epoch == 0:
                order = rng.permutation(len(train))
            start = (step % steps_per_epoch) * cfg.batch_size
            chunk = order[start:start + cfg.batch_size]
            model.zero_grad()
            trained.grads.fill(0.0)
            stats = [dpo_forward_backward(model, train[i], refs[i], beta, 1.0 / len(chunk)) for i in chunk]
            opt.step(cosine_lr(step, cfg.lr, cfg.warmup_steps, total, cfg.lr / 10))
            record = {"step": step + 1, "loss": round(float(np.mean([s["loss"] for s in stats])), 5),
                      "reward_margin": round(float(np.mean([s["margin"] for s in stats])) * beta, 5),
                      "accuracy": round(float(np.mean([s["correct"] for s in stats])), 3)}
            records.append(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['accuracy']:.2f}")
            bar.update(1)
    if out_dir is not None:
        _save(llm, out_dir, records)
    return records


def arithmetic_preferences(n: int, seed: int = 0) -> list[dict]:
    """Preference pairs: the right sum or product (chosen) against a near miss (rejected)."""
    rng = np.random.default_rng(seed)
    out = []
    for record in arithmetic_examples(n, seed):
        question, answer = record["messages"][0]["content"], record["messages"][1]["content"]
        right = int(answer.rstrip(".").split()[-1])
        wrong = right + int(rng.choice([-10, -2, -1, 1, 2, 10]))
        out.append({"prompt": question, "chosen": answer, "rejected": answer.replace(f"{right}.", f"{wrong}.")})
    return out
