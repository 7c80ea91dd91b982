"""Fine-tuning: supervised (SFT) and preference tuning (DPO), of all weights or of LoRA adapters.

SFT examples are JSONL lines of chat `messages` (system/user/assistant) or `prompt`/`completion`
pairs. Each is formatted with the model's chat template, and only the assistant's tokens are
trained on: every other position's target is -100, which the loss ignores. Examples are padded
into batches (padding ignored too). DPO pairs are `prompt`/`chosen`/`rejected` lines, trained
against the model's own log-probabilities from before training. Every weight of a float32 model
trains, or LoRA adapters (pyllm.lora) on a frozen base, which may stay quantized (GGUF). With an
output folder, runs checkpoint every few steps, save one on Ctrl-C, and resume exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from pyllm import distributed, kernels, report
from pyllm.interrupt import StopRequest
from pyllm.io.atomic import write_text
from pyllm.io.checkpoint import (read_checkpoint, refuse_earlier_run, remove_checkpoint, rng_from, rng_state,
                                 write_checkpoint)
from pyllm.lora import LoRA, LoRAConfig
from pyllm.models import IGNORE
from pyllm.optim import AdamW, cosine_lr
from pyllm.progress import bar as progress_bar

CHECKPOINT = "checkpoint"
LOG = "finetune_log.jsonl"
REPORT = "finetune_report.html"   # loss, validation loss, learning rate, gradient norm, tokens/s
RESOLVED = "finetune_config.json"  # the run's settings as resolved
ADAPTER = "adapter"                    # LoRA runs: the adapters on their own, a peft folder
STATE = "state.json"                  # in the checkpoint: step, RNG, data order, log, settings
TRAINED = "trained.safetensors"       # in the checkpoint: the trained values and AdamW's m and v


class DataError(ValueError):
    """A bad example, named by file and line."""


@dataclass
class Example:
    ids: np.ndarray        # the formatted conversation's tokens
    targets: np.ndarray    # next-token targets: the assistant's tokens, IGNORE elsewhere
    line: int


def _read_jsonl(path, parse: Callable, what: str, skip_bad: bool, say: Callable[[str], None]) -> list:
    """parse(record, line number) of every JSONL line, checked line by line; the first bad line
    (invalid JSON, or a DataError from parse) stops the run with its number, unless skip_bad,
    which drops bad lines with a notice."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such data file: {path}")
    items, skipped = [], 0
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                items.append(parse(json.loads(line), number))
            except (json.JSONDecodeError, DataError) as exc:
                reason = f"not valid JSON ({exc.msg})" if isinstance(exc, json.JSONDecodeError) else str(exc)
                message = f"{path}:{number}: {reason}"
                if not skip_bad:
                    raise DataError(message + " (or pass --skip-bad to leave such lines out)") from None
                skipped += 1
                say(f"skipping {message}")
    if skipped:
        say(f"skipped {skipped} bad line(s) of {path}")
    if not items:
        raise DataError(f"{path}: no usable {what}")
    return items


def read_examples(path, llm, skip_bad: bool = False, say: Callable[[str], None] = print) -> list[Example]:
    """Examples from a JSONL file of "messages" or "prompt"/"completion" lines (see _read_jsonl)."""
    return _read_jsonl(path, lambda record, number: _example(record, llm, number), "examples", skip_bad, say)


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
    ids: list[int] = []
    learn: list[bool] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if not m["content"].strip():
            raise DataError(f"message {i} is an empty assistant turn")
        # Encoded as chat encodes them: a message's text that spells a special token stays text.
        before = llm.encode_chat(messages[:i], add_generation_prompt=True) if i else []
        through = llm.encode_chat(messages[:i + 1], add_generation_prompt=False)
        if before[:len(ids)] != ids or through[:len(before)] != before or len(through) <= len(before):
            raise DataError("the chat template does not extend the conversation token by token")
        # Tokens up to the reply are context; the reply (and its end-of-turn tokens) is learned.
        learn += [False] * (len(before) - len(ids)) + [True] * (len(through) - len(before))
        ids = through
    full = llm.encode_chat(messages, add_generation_prompt=False)
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
    warmup_steps: Optional[int] = None   # None: a tenth of the run, 1 to 10 steps (10 of a 15-step run left it no time)
    val_fraction: float = 0.1
    seed: int = 0
    lora_rank: int = 0          # > 0: train LoRA adapters of this rank on a frozen base
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0   # dropout on the adapters' input, while training
    checkpoint_interval: int = 50   # steps between checkpoints (in out_dir/checkpoint, when saving)
    distributed: str = "auto"   # under mpirun: each rank takes every N-th item of a batch (pyllm.distributed)
    resume: bool = False        # go on from out_dir/checkpoint
    overwrite: bool = False     # write over an earlier run in out_dir (else refused)

    def __post_init__(self) -> None:
        if not self.epochs > 0 or self.batch_size < 1 or self.checkpoint_interval < 1 or not self.lr > 0:
            raise ValueError("need epochs > 0, lr > 0, batch_size >= 1 and checkpoint_interval >= 1")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must lie in [0, 1), got {self.lora_dropout}")


class FinetuneInterrupted(KeyboardInterrupt):
    """Ctrl-C: a checkpoint was saved first (go on with resume=True / --resume)."""


def sft(llm, train: list[Example], val: list[Example], cfg: SFTConfig, out_dir=None,
        say: Callable[[str], None] = print, progress: bool = True) -> list[dict]:
    """Fine-tunes llm.model on the examples (all parameters, or LoRA adapters); returns the log
    records. With out_dir: checkpoints there, Ctrl-C saves one, and the result is saved there."""

    def step(chunk: list[int], mine: list[int], record: dict) -> float:
        # This process's examples of the batch, weighted by their share of its learned tokens, so that
        # the ranks' gradients and losses add up to those of the batch's token mean.
        learned = sum(int(np.count_nonzero(np.asarray(train[i].targets) != IGNORE)) for i in chunk)
        share = [train[chunk[k]] for k in mine]
        record["tokens"] = float(sum(len(e.ids) for e in share))
        if not share or not learned:
            return 0.0
        ids, targets = batch(share)
        weight = int(np.count_nonzero(targets != IGNORE)) / learned
        return llm.model.forward_backward(ids, targets, loss_scale=weight) * weight

    def evaluate(record: dict, step: int, total: int) -> None:
        if val and (step == total or step % max(1, total // 5) == 0):
            record["val_loss"] = round(masked_loss(llm.model, val), 5)

    tokens = [a for e in train for a in (e.ids, e.targets)]
    return _loop(llm, len(train), _fingerprint(tokens), cfg, step, evaluate, out_dir, "fine-tuning", {}, say, progress)


def _loop(llm, n_items: int, fingerprint: str, cfg: SFTConfig, step_fn, eval_fn, out_dir, desc: str, extra: dict,
          say: Callable[[str], None], progress: bool) -> list[dict]:
    """The loop SFT and DPO share: shuffled batches of item indices each epoch, AdamW with warm-up
    and cosine decay, a progress bar; with out_dir, a checkpoint every cfg.checkpoint_interval steps
    and on Ctrl-C (then FinetuneInterrupted), resume from it, and the result saved at the end.
    step_fn(indices, mine, record) adds the gradients of the batch's items at positions `mine` (this
    process's share: all of them, or under mpirun every N-th), returns their part of the batch's loss
    and may add figures to the record; under mpirun the gradients, the loss and the record's figures
    are summed over the ranks, and rank 0 alone writes. fingerprint identifies the training data;
    `extra` is state kept in the checkpoint (DPO's reference log-probabilities)."""
    world = distributed.connect(cfg.distributed)
    threads = distributed.threads_per_rank(world, None)
    if threads:
        kernels.set_num_threads(threads)
    if not world.is_root:
        say, progress = _silent, False
    model = llm.model
    trained = _trained_parameters(model, cfg, say)
    opt = AdamW(trained, lr=cfg.lr, weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip)
    steps_per_epoch = math.ceil(n_items / cfg.batch_size)
    total = max(1, int(round(cfg.epochs * steps_per_epoch)))
    rng = np.random.default_rng(cfg.seed)
    order, step, records = rng.permutation(n_items), 0, []
    checkpoint = Path(out_dir) / CHECKPOINT if out_dir is not None else None
    if out_dir is not None:
        world.root_first(lambda: refuse_earlier_run(out_dir, (CHECKPOINT, LOG, "config.json", ADAPTER), cfg.resume,
                                                    cfg.overwrite), "checking the output folder")
        if world.is_root:   # every setting the run uses, resolved (flags, a --config file, defaults)
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            write_text(Path(out_dir) / RESOLVED, json.dumps(dataclasses.asdict(cfg), indent=1) + "\n")
    if cfg.resume:
        if checkpoint is None:
            raise ValueError("resume needs the output folder that holds the checkpoint")
        step, rng, order, records = _load_checkpoint(checkpoint, trained, opt, cfg, fingerprint, extra)
        say(f"resuming from {checkpoint} at step {step} of {total}")
    stop = StopRequest() if checkpoint is not None else None
    stopping = False
    mine = lambda chunk: [k for k in range(len(chunk)) if k % world.size == world.rank]   # noqa: E731
    writes = world.is_root and checkpoint is not None
    start = time.perf_counter()
    try:
        with exact_products(model), progress_bar(total=total, initial=step, desc=desc, unit="step",
                                                  enabled=progress) as bar:
            while step < total and not stopping:
                world.heartbeat(step)
                if step and step % steps_per_epoch == 0:
                    order = rng.permutation(n_items)
                position = (step % steps_per_epoch) * cfg.batch_size
                chunk = order[position:position + cfg.batch_size]
                model.zero_grad()
                trained.grads.fill(0.0)
                record: dict = {}
                t0 = time.perf_counter()
                if model.lora is not None:   # dropout on, with masks drawn for this step
                    model.lora.dropout_seed = cfg.seed * 1_000_003 + step
                try:
                    loss = step_fn(chunk, mine(chunk), record)
                finally:
                    if model.lora is not None:
                        model.lora.dropout_seed = None
                keys = sorted(record)
                totals = world.sum([loss, float(bool(stop and stop.requested))] + [record[k] for k in keys],
                                   "the step's loss")
                loss, stopping = totals[0], totals[1] > 0   # every rank stops after the same step
                record = {k: round(v, 5) for k, v in zip(keys, totals[2:])}
                world.allreduce(trained.grads, "the gradient all-reduce")
                if not math.isfinite(loss):
                    raise FloatingPointError(f"the loss is {loss} at step {step + 1}"
                                             + (f"; the last checkpoint is in {checkpoint}" if checkpoint else ""))
                warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, min(10, total // 10))
                lr = cosine_lr(step, cfg.lr, warmup, total, cfg.lr / 10)
                opt.step(lr)
                step += 1
                tokens_per_s = record.pop("tokens", 0) / max(time.perf_counter() - t0, 1e-9)
                record = {"step": step, "loss": round(loss, 5), **record, "lr": lr,
                          "grad_norm": round(opt.last_grad_norm, 4), "tokens_per_s": round(tokens_per_s, 1),
                          "time_s": round(time.perf_counter() - start, 2)}
                eval_fn(record, step, total)
                records.append(record)
                bar.set_postfix({k: f"{v:.3f}" for k, v in record.items() if k in ("loss", "accuracy")})
                bar.update(1)
                if writes and step % cfg.checkpoint_interval == 0 and step < total:
                    _save_checkpoint(checkpoint, trained, opt, cfg, step, rng, order, records, fingerprint, extra)
    finally:
        if stop:
            stop.restore()
    if stopping and step < total:
        if writes:
            _save_checkpoint(checkpoint, trained, opt, cfg, step, rng, order, records, fingerprint, extra)
        world.barrier("the checkpoint")
        interrupted = FinetuneInterrupted(f"interrupted at step {step} of {total}; saved {checkpoint} "
                                          f"(go on with --resume)")
        interrupted.quiet = not world.is_root
        raise interrupted
    if out_dir is not None and world.is_root:
        _save(llm, out_dir, records)
        remove_checkpoint(checkpoint)   # the finished run needs no checkpoint
    world.barrier("the final save")
    return records


def _silent(message: str) -> None:
    pass


def _fingerprint(data: list[np.ndarray]) -> str:
    """A hash of the training tokens, so a resumed run can tell that its data changed."""
    h = hashlib.sha256()
    for array in data:
        h.update(np.ascontiguousarray(array, np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()


_RESUME_FREE = ("resume", "overwrite", "checkpoint_interval", "distributed")   # what a resumed run may change


def _save_checkpoint(folder: Path, trained, opt, cfg: SFTConfig, step: int, rng, order, records, fingerprint,
                     extra: dict) -> None:
    """The trained values (the model's or the adapters'), AdamW's moments and everything that
    decides the next step, written whole into a new folder and swapped in."""
    state = {"step": step, "optimizer_step": opt.step_count, "rng": rng_state(rng),
             "order": [int(i) for i in order], "records": records, "data": fingerprint,
             "config": dataclasses.asdict(cfg), "extra": extra}
    write_checkpoint(folder, {"params": trained.params, "m": opt.m, "v": opt.v}, state, TRAINED, STATE)


def _load_checkpoint(folder: Path, trained, opt, cfg: SFTConfig, fingerprint: str, extra: dict):
    found = read_checkpoint(folder, TRAINED, STATE)
    if found is None:
        raise FileNotFoundError(f"resume: no checkpoint in {folder}")
    state, arrays = found.state, found.tensors
    saved = state["config"]
    changed = [k for k, v in saved.items() if k not in _RESUME_FREE and getattr(cfg, k, v) != v]
    if changed:
        raise ValueError("resume: the checkpoint was made with other settings: "
                         + ", ".join(f"{k}={saved[k]!r} (now {getattr(cfg, k)!r})" for k in changed))
    if state["data"] != fingerprint:
        raise ValueError("resume: the training data differs from the checkpoint's")
    changed = [k for k in extra if k in state["extra"] and state["extra"][k] != extra[k]]
    if changed:
        raise ValueError(f"resume: the checkpoint was made with {changed[0]}={state['extra'][changed[0]]!r}")
    if arrays["params"].shape != trained.params.shape:
        raise ValueError(f"resume: the checkpoint holds {arrays['params'].size} trained values, "
                         f"this model {trained.params.size}: not the same model")
    # Every check passed: only now is anything of the caller's changed.
    trained.params[...] = arrays["params"]
    opt.load_state_dict({"m": arrays["m"], "v": arrays["v"], "step": state["optimizer_step"]})
    extra.update(state["extra"])
    return int(state["step"]), rng_from(state["rng"]), np.asarray(state["order"], np.int64), state["records"]


def _trained_parameters(model, cfg: SFTConfig, say: Callable[[str], None]):
    """What the optimizer updates: the model itself, or LoRA adapters attached to its frozen base
    (which may stay quantized)."""
    if not cfg.lora_rank:
        if model.quantized:
            raise ValueError("training every weight needs float32 weights: load the GGUF model with "
                             "dequantize=True, or train LoRA adapters (lora_rank) on the quantized base")
        return model
    model.lora = LoRA(model, LoRAConfig(rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                                        seed=cfg.seed))
    say(f"LoRA rank {cfg.lora_rank}: {model.lora.num_params:,} trained parameters, the base frozen"
        + (" and kept quantized" if model.quantized else ""))
    return model.lora


@contextlib.contextmanager
def exact_products(model):
    """Training computes products with a quantized base on float activations (not rounded to int8
    as decoding does), so the gradients are those of the loss being reported."""
    saved = model.int8_activations
    model.int8_activations = False
    try:
        yield
    finally:
        model.int8_activations = saved


def _save(llm, out_dir, records: list[dict]) -> None:
    """The model folder (adapters merged in, float32) and the log; adapters also on their own, in
    peft's format. A quantized base is expanded to float32 for the merge (llm.model becomes it)."""
    model = llm.model
    if model.lora is not None:
        lora = model.lora
        # peft's AutoPeftModelForCausalLM opens the adapter with the base it names: a model folder
        # (a GGUF base has none transformers opens as it is).
        base = str(llm.source) if llm.source is not None and llm.source.is_dir() else ""
        lora.save(Path(out_dir) / ADAPTER, base_model=base)
        model.lora = None
        model.release_buffers()   # training's activations: not needed to merge and save
        if model.quantized:
            llm.model = model = model.dequantized()
        lora.merge_into(model)
    llm.save(out_dir)
    write_jsonl(Path(out_dir) / LOG, records)
    report.write(Path(out_dir) / REPORT, report.training_report(Path(out_dir) / LOG, f"fine-tuning {Path(out_dir).name}"))


def write_jsonl(path, records) -> None:
    """One JSON object per line, written atomically."""
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
    """Preference pairs from JSONL lines of "prompt", "chosen" and "rejected" strings (see _read_jsonl)."""
    def parse(record, number: int) -> Pair:
        if not isinstance(record, dict) or not all(isinstance(record.get(k), str)
                                                   for k in ("prompt", "chosen", "rejected")):
            raise DataError('a line needs "prompt", "chosen" and "rejected" strings')
        make = lambda answer: _example({"prompt": record["prompt"], "completion": answer}, llm, number)
        return Pair(make(record["chosen"]), make(record["rejected"]), number)

    return _read_jsonl(path, parse, "preference pairs", skip_bad, say)


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
    with _dropout_for(model, 0):
        chosen = sequence_logprob(model, pair.chosen)
    with _dropout_for(model, 1):
        rejected = sequence_logprob(model, pair.rejected)
    loss, weight = dpo_loss(chosen, rejected, ref[0], ref[1], beta)
    for side, (example, sign) in enumerate(((pair.chosen, 1.0), (pair.rejected, -1.0))):
        count = int(np.count_nonzero(example.targets != IGNORE))
        with _dropout_for(model, side):   # the same masks as its log-probability's forward
            model.forward_backward(example.ids[None, :], example.targets[None, :],
                                   loss_scale=sign * scale * beta * weight * count)
    margin = (chosen - ref[0]) - (rejected - ref[1])
    return {"loss": loss, "margin": margin, "correct": margin > 0}


@contextlib.contextmanager
def _dropout_for(model, part: int):
    """While adapter dropout is on, masks of their own for one part of a step (a pair's side, a
    pair): derived from the step's seed, so a part's forward and backward draw the same."""
    lora = getattr(model, "lora", None)
    if lora is None or lora.dropout_seed is None:
        yield
        return
    step_seed = lora.dropout_seed
    lora.dropout_seed = (step_seed * 7919 + 1 + part) % (1 << 63)
    try:
        yield
    finally:
        lora.dropout_seed = step_seed


def reference_logprobs(model, pairs: list[Pair], progress: bool = False) -> list[tuple[float, float]]:
    """The frozen reference: log-probabilities of every pair under the model before training."""
    return [(sequence_logprob(model, p.chosen), sequence_logprob(model, p.rejected))
            for p in progress_bar(pairs, desc="reference log-probabilities", unit="pair", enabled=progress)]


def preference_accuracy(model, pairs: list[Pair]) -> float:
    """Share of pairs whose chosen answer the model finds likelier than the rejected one."""
    return float(np.mean([sequence_logprob(model, p.chosen) > sequence_logprob(model, p.rejected) for p in pairs]))


def dpo(llm, train: list[Pair], cfg: SFTConfig, beta: float = 0.1, out_dir=None,
        say: Callable[[str], None] = print, progress: bool = True) -> list[dict]:
    """DPO against the model as it was before training (reference log-probs computed once, and
    kept in the checkpoints so a resumed run compares with the same reference)."""
    extra: dict = {"beta": beta}
    if not cfg.resume:
        if llm.model.quantized and not cfg.lora_rank:
            _trained_parameters(llm.model, cfg, say)   # refuses, before the reference pass
        with exact_products(llm.model):
            extra["reference"] = reference_logprobs(llm.model, train, progress)

    def step(chunk: list[int], mine: list[int], record: dict) -> float:
        stats = []
        for k in mine:   # this process's pairs of the batch; each pair its own dropout masks
            i = chunk[k]
            with _dropout_for(llm.model, 2 + k):
                stats.append(dpo_forward_backward(llm.model, train[i], extra["reference"][i], beta, 1.0 / len(chunk)))
        record["tokens"] = float(sum(int(p.ids.size) for k in mine for p in (train[chunk[k]].chosen,
                                                                           train[chunk[k]].rejected)))
        record["reward_margin"] = sum(s["margin"] for s in stats) * beta / len(chunk)
        record["accuracy"] = sum(s["correct"] for s in stats) / len(chunk)
        return sum(s["loss"] for s in stats) / len(chunk)

    tokens = [a for p in train for a in (p.chosen.ids, p.chosen.targets, p.rejected.ids, p.rejected.targets)]
    return _loop(llm, len(train), _fingerprint(tokens), cfg, step, lambda record, step, total: None, out_dir,
                 "dpo", extra, say, progress)


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
