"""Pretraining by next-token prediction: the loop, evaluation, checkpoints and resume.

`train(TrainConfig(...))` prepares data (training a tokenizer on it when none is given), then runs
AdamW with warm-up + cosine decay, gradient clipping and accumulation, evaluating on the held-out
split. Everything that decides the next step (weights, moments, step, data RNG) is checkpointed, so a
resumed run continues the loss curve exactly. The output folder is a Hugging Face model folder.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from pyllm import distributed, kernels, report
from pyllm.data import EOT, TokenData, default_documents, id_dtype, iter_documents
from pyllm.interrupt import StopRequest
from pyllm.io.atomic import write_text
from pyllm.io.checkpoint import (Checkpoint, read_checkpoint, refuse_earlier_run, rng_from, rng_state,
                                 write_checkpoint)
from pyllm.io.tokenizer_files import tokenizer_document, tokenizer_from_document
from pyllm.model import Model
from pyllm.models import ModelConfig, parameter_specs
from pyllm.optim import AdamW, cosine_lr
from pyllm.tokenizer import Tokenizer
from pyllm.progress import bar as progress_bar

CHECKPOINT = "checkpoint"
STATE = "trainer_state.json"          # in the checkpoint: step, RNG, settings
MOMENTS = "optimizer.safetensors"     # in the checkpoint: AdamW's m and v (beside the model folder)
LOG = "log.jsonl"
REPORT = "report.html"     # the log drawn: loss, validation loss, learning rate, gradient norm, tokens/s
RESOLVED = "train_config.json"   # every setting the run used (flags, --config file and defaults resolved)


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss); the last good checkpoint is kept."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C: the state was saved to a checkpoint first."""


@dataclass
class TrainConfig:
    """Everything a training run needs; the defaults train the `small` preset on the default corpus."""

    out_dir: str = "out"
    data: Optional[list[str]] = None          # files, folders, JSONL; None: the stdlib sources
    tokenizer: Optional[str] = None           # a tokenizer file; None: train one on the data
    vocab_size: int = 8192                    # of the tokenizer trained when none is given
    preset: str = "small"
    arch: Optional[str] = None                # gpt2, llama, qwen2, qwen3, gemma3; None: the preset's (gpt2 for sizes)
    n_layer: Optional[int] = None
    n_head: Optional[int] = None
    n_embd: Optional[int] = None
    block_size: Optional[int] = None
    batch_size: int = 8
    grad_accum: int = 1
    max_steps: int = 1000
    max_minutes: Optional[float] = None       # a time budget: plans max_steps to fit it, and stops there
    stop_at_step: Optional[int] = None        # stop (with a checkpoint) here; the schedule still plans max_steps
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip: Optional[float] = 1.0
    eval_interval: int = 100
    eval_batches: int = 10
    checkpoint_interval: int = 200
    val_fraction: float = 0.1
    seed: int = 0
    threads: Optional[int] = None             # kernel threads per process (default: the cores, shared by the ranks)
    distributed: str = "auto"                 # "auto" (MPI when mpirun started several), "mpi", "none"
    zero: int = 0                             # 1: ZeRO-1, AdamW's moments sharded over the ranks
    resume: bool = False
    extend_schedule: bool = False             # resume with a new max_steps: the cosine goes on from the rate it had
    schedule_restart: Optional[list] = None   # [step, lr] where an extended run's new cosine starts
    overwrite: bool = False                   # write over an earlier run in out_dir (else refused)
    progress: bool = True

    def __post_init__(self) -> None:
        positive = ("vocab_size", "batch_size", "grad_accum", "max_steps", "eval_interval", "eval_batches",
                    "checkpoint_interval")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("batch_size", "grad_accum", "eval_batches"):   # each a loop or an allocation per step
            if getattr(self, name) > 1 << 20:
                raise ValueError(f"{name} is {getattr(self, name)}, more than pyllm takes ({1 << 20})")
        if not (math.isfinite(self.lr) and self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise ValueError(f"need a finite lr > 0 and 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.threads is not None and not 0 <= self.threads <= kernels.MAX_THREADS:
            raise ValueError(f"threads must lie in [0, {kernels.MAX_THREADS}] (0: every core), got {self.threads}")
        if self.distributed not in distributed.MODES:
            raise ValueError(f"distributed must be one of {', '.join(distributed.MODES)}, got {self.distributed!r}")
        if self.zero not in (0, 1):
            raise ValueError(f"zero must be 0 or 1 (ZeRO-1: AdamW's moments sharded), got {self.zero!r}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"max_minutes must be positive, got {self.max_minutes}")
        id_dtype(self.vocab_size)
        self.model_config(self.vocab_size)   # sizes checked now, before a tokenizer is trained for them

    def model_config(self, vocab_size: int) -> ModelConfig:
        overrides = {k: getattr(self, k) for k in ("n_layer", "n_head", "n_embd", "block_size")
                     if getattr(self, k) is not None}
        return ModelConfig.preset(self.preset, arch=self.arch, vocab_size=vocab_size, **overrides)


@dataclass
class TrainResult:
    model: Model
    tokenizer: object
    step: int
    history: list = field(default_factory=list)   # the log records of this run
    interrupted: bool = False
    is_root: bool = True                           # rank 0 of a distributed run (the one that writes)


def prepare_data(cfg: TrainConfig, say: Callable[[str], None] = print):
    """(tokenizer, TokenData) for cfg: tokenizes into out_dir/data once; later runs reuse it."""
    out = Path(cfg.out_dir)
    data_dir = out / "data"
    tok_path = out / "tokenizer.json"
    source = {"data": cfg.data, "tokenizer": cfg.tokenizer, "vocab_size": cfg.vocab_size,
              "val_fraction": cfg.val_fraction}
    source_path = data_dir / "source.json"
    if source_path.is_file() and tok_path.is_file() and json.loads(source_path.read_text()) == source:
        tokenizer = Tokenizer.load(tok_path)
        data = TokenData.open(data_dir)
        if data.vocab_size == tokenizer.vocab_size:
            return tokenizer, data
    documents = list(iter_documents(cfg.data) if cfg.data else default_documents())
    if not documents:
        raise ValueError("no documents in the data")
    if not cfg.data:
        say(f"no --data: using the Python standard library's sources ({len(documents)} files)")
    if source_path.exists():
        source_path.unlink()    # the data is rebuilt: only a complete rebuild may say what it holds
    if cfg.tokenizer:
        tokenizer = Tokenizer.load(cfg.tokenizer)
    else:
        say(f"training a {cfg.vocab_size}-token BPE tokenizer on the data")
        tokenizer = Tokenizer.train(documents, cfg.vocab_size, special_tokens=[EOT], progress=cfg.progress)
    id_dtype(tokenizer.vocab_size)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(tok_path, format="hf")
    data = TokenData.build(documents, tokenizer, data_dir, cfg.val_fraction, progress=cfg.progress)
    write_text(source_path, json.dumps(source))
    say(f"data: {len(data.train):,} training and {len(data.val):,} validation tokens in {data_dir}")
    return tokenizer, data


def evaluate(model: Model, data: TokenData, cfg: TrainConfig, block_size: int,
             world: distributed.World = distributed.World()) -> float:
    """Mean validation loss over eval_batches fixed batches (the same ones at every evaluation),
    shared out over the ranks of a distributed run (batch i on rank i mod N)."""
    rng = np.random.default_rng(cfg.seed + 1)
    total = 0.0
    for i in range(cfg.eval_batches):
        batch = data.batch("val", cfg.batch_size, block_size, rng)
        if i % world.size == world.rank:
            total += model.loss(*batch)
    return world.sum([total], "the validation loss")[0] / cfg.eval_batches


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(out_dir: Path, model: Model, tokenizer, moments: tuple[np.ndarray, np.ndarray],
                    optimizer_step: int, step: int, rng: np.random.Generator, cfg: TrainConfig,
                    time_s: float = 0.0) -> Path:
    """Writes out_dir/checkpoint as a whole: the model folder, AdamW's moments (m, v of the whole
    model) and the trainer state. cfg is the run as one process would make it (grad_accum: the
    micro-batches of the whole step), so the checkpoint resumes with any number of ranks."""
    state = {"step": step, "optimizer_step": optimizer_step, "rng": rng_state(rng), "time_s": round(time_s, 2),
             "train_config": dataclasses.asdict(cfg), "model_config": model.config.to_dict()}
    return write_checkpoint(out_dir / CHECKPOINT, {"m": moments[0], "v": moments[1]}, state, MOMENTS, STATE,
                            extra=lambda tmp: model.save_pretrained(tmp, tokenizer=tokenizer), indent=1)


def resumed_config(checkpoint: Checkpoint, cfg: TrainConfig, ranks: int = 1) -> TrainConfig:
    """The settings a resumed run goes on with: the checkpoint's, except where this call changes how
    long to go on or how to run (threads, ranks, ZeRO); the checkpoint's state checked first (a
    ValueError naming it). With `ranks` processes each takes grad_accum / ranks of the checkpoint's
    micro-batches per step, which must divide evenly (the global batch is the run's)."""
    state, where = checkpoint.state, checkpoint.path / STATE
    saved = state.get("train_config")
    for key, ok in (("train_config", isinstance(saved, dict)), ("rng", isinstance(state.get("rng"), dict))):
        if not ok:
            raise ValueError(f"{where}: {key} is missing or not an object")
    for key in ("step", "optimizer_step"):
        value = state.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{where}: {key} must be an integer >= 0, got {value!r}")
    defaults = TrainConfig()
    run_length = {k for k in ("max_steps", "max_minutes", "stop_at_step") if getattr(cfg, k) != getattr(defaults, k)}
    keep = run_length | {"stop_at_step", "progress", "resume", "overwrite", "threads", "out_dir", "distributed",
                         "zero", "extend_schedule"}
    try:
        cfg = dataclasses.replace(cfg, **{k: v for k, v in saved.items()
                                          if k not in keep and k in TrainConfig.__dataclass_fields__})
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: its train_config does not make a run ({exc})") from None
    planned = saved.get("max_steps")
    if "max_steps" in run_length and isinstance(planned, int) and cfg.max_steps != planned \
            and saved.get("max_minutes") is None:
        step = state["step"]
        before = cosine_lr(step, cfg.lr, cfg.warmup_steps, planned, cfg.min_lr, _restart(cfg))
        if not cfg.extend_schedule:
            after = cosine_lr(step, cfg.lr, cfg.warmup_steps, cfg.max_steps, cfg.min_lr, _restart(cfg))
            raise ValueError(f"{where}: this run's learning-rate schedule ends at step {planned}; --max-steps "
                             f"{cfg.max_steps} would redraw it, and the rate at step {step} would jump from "
                             f"{before:.3g} to {after:.3g}. Pass --extend-schedule to go on from {before:.3g} along "
                             f"a new cosine down to --min-lr {cfg.min_lr:g} at step {cfg.max_steps}, or use "
                             f"--stop-at-step to stop earlier on the schedule as it is")
        if cfg.max_steps <= step:
            raise ValueError(f"{where}: the checkpoint is at step {step}; --max-steps {cfg.max_steps} leaves nothing "
                             f"to train")
        cfg = dataclasses.replace(cfg, schedule_restart=[step, before])
    if cfg.grad_accum % ranks:
        raise ValueError(f"{where}: a step of this run is {cfg.grad_accum} micro-batch(es) of {cfg.batch_size} "
                         f"sequences; {ranks} ranks cannot share that out evenly. Resume with a number of ranks "
                         f"that divides {cfg.grad_accum} (the global batch must stay the same)")
    return dataclasses.replace(cfg, grad_accum=cfg.grad_accum // ranks)


def read_resume_state(checkpoint: Checkpoint, model_cfg: ModelConfig) -> dict:
    """What a resumed run needs from its checkpoint, checked against the run's model: the weights,
    AdamW's m and v, the step, the optimizer's step count and the data RNG's state."""
    saved = Model.from_pretrained(checkpoint.path)
    size = sum(math.prod(spec.shape) for spec in parameter_specs(model_cfg))
    tensors, where = checkpoint.tensors, checkpoint.path
    if saved.params.size != size:
        raise ValueError(f"{where}: its model has {saved.params.size} parameters, the run's {size}")
    for name in ("m", "v"):
        if name not in tensors or tensors[name].shape != (size,):
            raise ValueError(f"{where}: AdamW's {name} is missing or not of the model's {size} values")
    try:
        rng_from(checkpoint.state["rng"])
    except ValueError as exc:
        raise ValueError(f"{where}: the data RNG: {exc}") from None
    return {"params": saved.params, "m": np.asarray(tensors["m"], np.float32), "v": np.asarray(tensors["v"], np.float32),
            "step": int(checkpoint.state["step"]), "optimizer_step": int(checkpoint.state["optimizer_step"]),
            "rng": checkpoint.state["rng"], "time_s": _seconds(checkpoint.state.get("time_s"))}


def _seconds(value) -> float:
    """A checkpoint's time so far (0 when it has none: checkpoints from before it was kept)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
    return float(value) if ok else 0.0


# ----------------------------------------------------------------------------- the loop

def _share_run(world: distributed.World, prepared) -> tuple:
    """(cfg, tokenizer, data, resume state or None) on every rank: rank 0 prepared them (it alone
    reads the checkpoint, trains the tokenizer and writes the token files); the others receive them
    as buffers and JSON, so they need no shared folder and write nothing."""
    if world.size == 1:
        return prepared
    cfg, tokenizer, data, state = prepared if world.is_root else (None, None, None, None)
    fields = world.broadcast_json(dataclasses.asdict(cfg) if world.is_root else None, "sharing the settings")
    doc = world.broadcast_json(tokenizer_document(tokenizer.data()) if world.is_root else None,
                               "sharing the tokenizer")
    train_ids = world.broadcast_array(data.train if world.is_root else None, "sharing the training tokens")
    val_ids = world.broadcast_array(data.val if world.is_root else None, "sharing the validation tokens")
    has_state = world.broadcast_json(state is not None if world.is_root else None, "sharing the checkpoint")
    if not world.is_root:
        cfg = TrainConfig(**{**fields, "progress": False})
        tokenizer = Tokenizer(**vars(tokenizer_from_document(doc, "rank 0's tokenizer")))
        data = TokenData(Path(cfg.out_dir) / "data", train_ids, val_ids, tokenizer.vocab_size)
    if has_state:
        scalars = world.broadcast_json({k: state[k] for k in ("step", "optimizer_step", "rng", "time_s")}
                                       if world.is_root else None, "sharing the checkpoint")
        params = world.broadcast_array(state["params"] if world.is_root else None, "sharing the checkpoint")
        state = {**scalars, "params": params, "m": state["m"] if world.is_root else None,
                 "v": state["v"] if world.is_root else None}
    return cfg, tokenizer, data, state if has_state else None


def train(cfg: TrainConfig, say: Callable[[str], None] = print) -> TrainResult:
    """Runs (or resumes) training; returns the model, the tokenizer and this run's log records.
    Under mpirun (or cfg.distributed="mpi") each rank takes its share of every step's micro-batches
    and rank 0 alone writes (pyllm.distributed)."""
    world = distributed.connect(cfg.distributed)
    threads = distributed.threads_per_rank(world, cfg.threads)
    if threads:
        kernels.set_num_threads(threads)
    if not world.is_root:
        say = _silent
    out = Path(cfg.out_dir)

    def prepare():
        refuse_earlier_run(out, (CHECKPOINT, LOG, "config.json"), cfg.resume, cfg.overwrite)
        checkpoint = read_checkpoint(out / CHECKPOINT, MOMENTS, STATE) if cfg.resume else None
        if cfg.resume and checkpoint is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {out}")
        run_cfg = resumed_config(checkpoint, cfg, world.size) if checkpoint is not None else cfg
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / RESOLVED, json.dumps(dataclasses.asdict(run_cfg), indent=1) + "\n")
        tokenizer, data = prepare_data(run_cfg, say)
        model_cfg = run_cfg.model_config(tokenizer.vocab_size)
        for split, tokens in (("training", data.train), ("validation", data.val)):   # before any allocation
            if len(tokens) <= model_cfg.block_size:
                raise ValueError(f"the {split} split has {len(tokens)} tokens, not more than block_size "
                                 f"{model_cfg.block_size}: give more data, a smaller --block-size, or a larger "
                                 f"validation fraction")
        state = read_resume_state(checkpoint, model_cfg) if checkpoint is not None else None
        if checkpoint is not None:
            say(f"resuming from {checkpoint.path} at step {state['step']}")
        return run_cfg, tokenizer, data, state
    cfg, tokenizer, data, state = _share_run(world, world.root_first(prepare, "preparing the run"))
    model_cfg = cfg.model_config(tokenizer.vocab_size)
    model = Model(model_cfg, seed=cfg.seed)
    world.broadcast(model.params, "sharing the initial weights")   # every rank starts from rank 0's
    options = dict(lr=cfg.lr, weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip)
    sharded = cfg.zero == 1 and world.size > 1
    opt = distributed.ShardedAdamW(model, world, **options) if sharded else AdamW(model, **options)
    step, rng, earlier_s = 0, np.random.default_rng(cfg.seed), 0.0   # earlier_s: the time before a resume
    if state is not None:
        model.params[...] = state["params"]
        if sharded:
            opt.load_full_moments(state["m"], state["v"], state["optimizer_step"])
        else:
            for name in ("m", "v"):
                getattr(opt, name)[...] = world.broadcast_array(state[name], "sharing AdamW's moments")
            opt.step_count = state["optimizer_step"]
        step, rng = state["step"], rng_from(state["rng"])
        earlier_s = state["time_s"]
    accum = cfg.grad_accum * world.size               # micro-batches of a whole step, over every rank
    as_one = dataclasses.replace(cfg, grad_accum=accum)   # the run as one process makes it (checkpoints)
    say(f"{model}; {cfg.batch_size}x{model_cfg.block_size} tokens per micro-batch, {accum} micro-batch(es) "
        f"per step" + (f" over {world.describe()}, " if world.size > 1 else ", ") +
        f"{kernels.get_num_threads()} thread(s) per process")
    if sharded:
        say(f"ZeRO-1: AdamW's m and v take {(opt.m.nbytes + opt.v.nbytes) / 2 ** 20:.1f} MiB per rank instead of "
            f"{2 * model.params.nbytes / 2 ** 20:.1f} MiB (plus {opt.shard_grads.nbytes / 2 ** 20:.1f} MiB for this "
            f"rank's gradient shard)")
    groups = distributed.layer_groups(model) if world.size > 1 and not sharded else None
    log_path = out / LOG
    if world.is_root:
        _truncate_log(log_path, step)
    tokens_per_step = cfg.batch_size * model_cfg.block_size * accum
    history: list[dict] = []
    start_time = time.perf_counter()
    bar = progress_bar(total=cfg.max_steps, initial=step, desc="training", unit="step",
                       enabled=cfg.progress and world.is_root, dynamic_ncols=True)
    plan_from_time = cfg.max_minutes is not None and state is None
    max_steps_asked = cfg.max_steps
    stop = StopRequest()
    stopping = False

    def save() -> None:
        moments = opt.full_moments() if sharded else (opt.m, opt.v)   # a collective under ZeRO
        if world.is_root:
            save_checkpoint(out, model, tokenizer, moments, opt.step_count, step, rng, as_one,
                            earlier_s + time.perf_counter() - start_time)
            write_report(out)
    try:
        with open(log_path, "a", encoding="utf-8") if world.is_root else _NoLog() as log:
            out_of_time = False
            while step < min(cfg.max_steps, cfg.stop_at_step or cfg.max_steps) and not stopping \
                    and not out_of_time:
                t0 = time.perf_counter()
                world.heartbeat(step)
                lr = cosine_lr(step, cfg.lr, cfg.warmup_steps, cfg.max_steps, cfg.min_lr, _restart(cfg))
                model.zero_grad()
                buckets = world.buckets(model.grads, groups) if groups is not None else None
                loss = 0.0
                for micro in range(accum):   # every rank draws every batch: rank r computes r, r + N, ...
                    ids, targets = data.batch("train", cfg.batch_size, model_cfg.block_size, rng)
                    if micro % world.size != world.rank:
                        continue
                    last = micro + world.size >= accum
                    loss += model.forward_backward(ids, targets, loss_scale=1.0 / accum,
                                                   layer_done=buckets.layer_done if buckets and last else None) / accum
                comm_s = buckets.finish() if buckets is not None else 0.0
                loss, asked_to_stop = world.sum([loss, float(stop.requested)], "the step's loss")
                stopping = asked_to_stop > 0     # every rank stops after the same step
                if not math.isfinite(loss):
                    raise _quiet(TrainingError(f"the loss is {loss} at step {step + 1}; stopping. The last good "
                                               f"checkpoint is kept in {out / CHECKPOINT} (try a lower --lr)"), world)
                try:
                    opt.step(lr)
                except FloatingPointError as exc:
                    raise _quiet(TrainingError(f"{exc} at step {step + 1}; stopping. The last good checkpoint is "
                                               f"kept in {out / CHECKPOINT} (try a lower --lr)"), world) from None
                step += 1
                dt = time.perf_counter() - t0
                record = {"step": step, "loss": round(loss, 5), "lr": lr, "grad_norm": round(opt.last_grad_norm, 4),
                          "tokens_per_s": round(tokens_per_step / dt, 1),
                          "time_s": round(earlier_s + time.perf_counter() - start_time, 2)}
                if world.size > 1:   # communication the step waited for (ZeRO-1: all of it, in the optimizer)
                    record["comm_wait_s"] = round(comm_s + getattr(opt, "comm_s", 0.0), 4)
                due = step % cfg.eval_interval == 0   # before a re-plan below moves the interval
                if plan_from_time and step == 2:
                    pace_start = time.perf_counter()
                # The pace so far (from step 2: step 1 allocates buffers) plans how many steps fit the
                # budget: first at step 5, then again at every evaluation, as the pace settles. Rank 0's
                # clock decides for every rank.
                if plan_from_time and step >= 5 and (step == 5 or step % cfg.eval_interval == 0):
                    pace = (time.perf_counter() - pace_start) / (step - 2)
                    per_step = pace if step > cfg.eval_interval else \
                        pace * (1 + cfg.eval_batches / (3 * cfg.eval_interval))   # evaluations: forward only
                    left = 60 * cfg.max_minutes - (time.perf_counter() - start_time)
                    planned = min(max_steps_asked, max(step + 1, step + int(left / per_step)))
                    planned = int(world.broadcast_json(planned if world.is_root else None, "planning the steps"))
                    # At least 4 evaluations in the planned run, so a short one still shows a curve.
                    interval = min(cfg.eval_interval, max(1, planned // 4))
                    if planned != cfg.max_steps or interval != cfg.eval_interval:
                        cfg = dataclasses.replace(cfg, max_steps=planned, eval_interval=interval)
                        as_one = dataclasses.replace(as_one, max_steps=planned, eval_interval=interval)
                        bar.total = planned
                        if step == 5:
                            say(f"{cfg.max_minutes} min at {pace:.2f} s/step: planning {planned} steps")
                out_of_time = cfg.max_minutes is not None and \
                    time.perf_counter() - start_time > 60 * cfg.max_minutes and step < cfg.max_steps
                if world.size > 1:
                    out_of_time = bool(world.broadcast_json(out_of_time if world.is_root else None, "the time budget"))
                if due or step == cfg.max_steps or out_of_time:
                    record["val_loss"] = round(evaluate(model, data, cfg, model_cfg.block_size, world), 5)
                    record["val_ppl"] = round(math.exp(min(record["val_loss"], 50.0)), 3)
                history.append(record)
                log.write(json.dumps(record) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{record['tokens_per_s']:.0f}",
                                **({"val": f"{record['val_loss']:.3f}"} if "val_loss" in record else {}))
                bar.update(1)
                if step % cfg.checkpoint_interval == 0:
                    save()
            if out_of_time:
                say(f"time budget of {cfg.max_minutes} min reached at step {step}")
    finally:
        bar.close()
        stop.restore()
    interrupted = stopping
    save()
    if world.is_root:
        model.save_pretrained(out, tokenizer=tokenizer)
    world.barrier("the final save")
    if interrupted:
        raise _quiet(TrainingInterrupted(f"interrupted at step {step}; saved {out / CHECKPOINT} "
                                         f"(continue with --resume)"), world)
    return TrainResult(model, tokenizer, step, history, is_root=world.is_root)


def _restart(cfg: TrainConfig) -> Optional[tuple[int, float]]:
    return tuple(cfg.schedule_restart) if cfg.schedule_restart else None


def _silent(message: str) -> None:
    pass


def _quiet(exc: BaseException, world: distributed.World) -> BaseException:
    """exc marked for the CLI to print on rank 0 only (every rank raises it; one says it)."""
    exc.quiet = not world.is_root
    return exc


class _NoLog:
    """The log of a rank that writes none."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def write(self, text: str) -> None:
        pass

    def flush(self) -> None:
        pass


def write_report(out: Path) -> Path:
    """OUT/report.html from OUT/log.jsonl: loss and validation loss, learning rate, gradient norm and
    tokens/s over the steps (rewritten at every checkpoint, so a long run can be watched)."""
    return report.write(out / REPORT, report.training_report(out / LOG, f"training {out.resolve().name}"))


def _truncate_log(path: Path, step: int) -> None:
    """Drops log records after `step`, so a resumed run's log reads like an uninterrupted one."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:   # a line cut short by a crash
            continue
        if record.get("step", 0) <= step:
            kept.append(line)
    write_text(path, "".join(line + "\n" for line in kept))


def read_log(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_losses(log_path, png_path) -> Optional[Path]:
    """A loss-curve PNG from the JSONL log (training and validation); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    records = read_log(log_path)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], label="train", lw=0.8)
    val = [r for r in records if "val_loss" in r]
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return Path(png_path)
