"""Data-parallel training over MPI (mpi4py), for when one machine is not enough: `mpirun -n N pyllm
train ...`. Every rank holds the model; a step's micro-batches are dealt out across the ranks, the
gradients summed with all-reduce in buckets started while backward is still running, and every rank
takes the same optimizer step (or, with ZeRO-1, updates its shard of AdamW's moments and gathers the
parameters). Collectives wait with a deadline and heartbeats, so a rank that dies or hangs ends the
job with a message naming it instead of a hang.

Not the training loop (pyllm.train, pyllm.finetune call in here) and not a transport of its own: MPI
is what clusters run. Without mpirun (or with --distributed none) `connect` gives a one-process world
whose collectives do nothing. Arrays and JSON travel as buffers; nothing is pickled.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Callable, Optional, Sequence

import numpy as np

from pyllm.io.hf import LAYER_OF
from pyllm.optim import AdamW

MODES = ("auto", "mpi", "none")
BUCKET_BYTES = 16 << 20          # gradients per all-reduce started during backward (PyTorch DDP: 25 MB)
DEFAULT_TIMEOUT_S = 300.0        # a collective that waits longer ends the job ($PYLLM_MPI_TIMEOUT)
_LAUNCHER_SIZE = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS", "SLURM_NTASKS")
_HEARTBEAT = 77                  # message tag of "rank r has come to its k-th collective"


class DistributedError(RuntimeError):
    """The MPI world cannot be used (mpi4py missing, a rank's failure before training)."""


def launched_by_mpirun() -> bool:
    """Whether this process is one of several that an MPI launcher started."""
    for key in _LAUNCHER_SIZE:
        try:
            if int(os.environ.get(key, "1")) > 1:
                return True
        except ValueError:
            continue
    return False


def connect(mode: str = "auto", timeout_s: Optional[float] = None) -> "World":
    """The world this process trains in: MPI's when mode is "mpi", or "auto" and an MPI launcher
    started several processes; else a world of one. timeout_s: how long a collective may wait
    (default $PYLLM_MPI_TIMEOUT, else 300 s)."""
    if mode not in MODES:
        raise ValueError(f"distributed must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "none" or (mode == "auto" and not launched_by_mpirun()):
        return World()
    try:
        from mpi4py import MPI   # optional: pyllm[mpi]; imported only when a world of several is asked for
    except ImportError:
        raise DistributedError("this process was started by an MPI launcher (or --distributed mpi was given), "
                               "but mpi4py is not installed: pip install \"pyllm[mpi]\"") from None
    if timeout_s is None:
        timeout_s = float(os.environ.get("PYLLM_MPI_TIMEOUT", DEFAULT_TIMEOUT_S))
    return MPIWorld(MPI, timeout_s)


class World:
    """One process: rank 0 of 1, every collective a no-op (so the loops are written once)."""

    rank, size, local_size = 0, 1, 1

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        return "1 process"

    def allreduce(self, array: np.ndarray, what: str = "all-reduce") -> np.ndarray:
        """array summed over the ranks, in place."""
        return array

    def sum(self, values: Sequence[float], what: str = "sum") -> list[float]:
        """Small float values summed over the ranks (float64)."""
        return [float(v) for v in values]

    def broadcast(self, array: np.ndarray, what: str = "broadcast") -> np.ndarray:
        """Rank 0's array into every rank's (same shape and dtype), in place."""
        return array

    def broadcast_json(self, value, what: str = "broadcast"):
        """A JSON value from rank 0 (what the others pass is ignored)."""
        return value

    def broadcast_array(self, array: Optional[np.ndarray], what: str = "broadcast") -> np.ndarray:
        """An array of any shape and dtype from rank 0 (the others pass None)."""
        return array

    def root_first(self, fn: Callable[[], object], what: str):
        """fn() run on rank 0 alone; its exception (if any) raised on every rank, so all stop together."""
        return fn()

    def barrier(self, what: str = "barrier") -> None:
        pass

    def heartbeat(self, step: int) -> None:
        """The training step this rank is on (what a timeout's message names)."""

    def buckets(self, grads: np.ndarray, groups: list) -> "Buckets":
        return Buckets(self, grads, groups)

    def start_allreduce(self, parts: list[np.ndarray]) -> list:
        return []

    def test(self, requests: list) -> bool:
        return True

    def wait(self, requests: list, what: str) -> None:
        pass

    def reduce_scatter(self, grads: np.ndarray, shard: np.ndarray, counts: list[int], what: str) -> None:
        shard[...] = grads

    def allgather(self, array: np.ndarray, counts: list[int], what: str) -> None:
        pass

    def gather(self, shard: np.ndarray, counts: list[int], what: str) -> Optional[np.ndarray]:
        return shard.copy()

    def scatter(self, full: Optional[np.ndarray], shard: np.ndarray, counts: list[int], what: str) -> None:
        shard[...] = full

    def abort(self, message: str) -> None:
        raise DistributedError(message)


class MPIWorld(World):
    """MPI.COMM_WORLD behind the same calls, each collective non-blocking and waited for with a
    deadline: past it, the ranks that have not said they reached this step are named and the job is
    aborted (MPI ends every rank, mpirun exits non-zero)."""

    def __init__(self, MPI, timeout_s: float) -> None:
        if not (timeout_s > 0 and math.isfinite(timeout_s)):
            raise ValueError(f"the MPI timeout must be a positive number of seconds, got {timeout_s!r}")
        self.MPI, self.comm, self.timeout_s = MPI, MPI.COMM_WORLD, float(timeout_s)
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.local_size = self.comm.Split_type(MPI.COMM_TYPE_SHARED).Get_size()
        self.step = -1                                 # the training step under way (for messages)
        self.arrived = 0                               # collectives this rank has come to
        self.seen = np.zeros(self.size, np.int64)      # how many each rank said it has come to
        self.heard = np.full(self.size, time.monotonic())   # when each rank last said anything
        self.ping_s = min(1.0, self.timeout_s / 5)          # how often a waiting rank says it still waits
        self._sends: list = []
        self._inbox = np.zeros(1, np.int64)

    def describe(self) -> str:
        pids = np.zeros(self.size, np.int64)
        pids[self.rank] = os.getpid()
        self.allreduce(pids, "naming the ranks")
        return (f"{self.size} MPI ranks ({self.local_size} on this machine; process ids "
                + ", ".join(f"rank {r}: {p}" for r, p in enumerate(pids)) + ")")

    # ------------------------------------------------------------------ waiting with a deadline

    def test(self, requests: list) -> bool:
        return bool(self.MPI.Request.Testall(requests)) if requests else True

    def wait(self, requests: list, what: str) -> None:
        if not requests:
            return
        self._announce()
        now = time.monotonic()
        deadline, next_ping = now + self.timeout_s, now + self.ping_s
        pause = 0.0
        while not self.MPI.Request.Testall(requests):
            now = time.monotonic()
            if now > next_ping:   # still here and waiting: what tells a rank that waits from one that hangs
                self._send_all(self.arrived)
                self._drain_heartbeats()
                next_ping = now + self.ping_s
            if now > deadline:
                self._timed_out(what)
            time.sleep(pause)
            pause = min(1e-3, 2 * pause or 1e-6)

    def _drain_heartbeats(self) -> None:
        status = self.MPI.Status()
        while self.comm.Iprobe(source=self.MPI.ANY_SOURCE, tag=_HEARTBEAT, status=status):
            peer = status.Get_source()
            self.comm.Recv([self._inbox, self.MPI.INT64_T], source=peer, tag=_HEARTBEAT)
            self.seen[peer] = max(self.seen[peer], int(self._inbox[0]))
            self.heard[peer] = time.monotonic()

    def _send_all(self, value: int) -> None:
        self._sends = [(r, b) for r, b in self._sends if not r.Test()]
        for peer in range(self.size):
            if peer != self.rank:
                buf = np.array([value], np.int64)
                self._sends.append((self.comm.Isend([buf, self.MPI.INT64_T], dest=peer, tag=_HEARTBEAT), buf))

    def heartbeat(self, step: int) -> None:
        self.step = int(step)

    def _announce(self) -> None:
        """Tells every other rank that this one has come to its next collective (each rank waits for
        the same collectives in the same order, so their counts name who is missing from one)."""
        self.arrived += 1
        self.seen[self.rank] = self.arrived
        self._send_all(self.arrived)
        self._drain_heartbeats()

    def _timed_out(self, what: str) -> None:
        self._drain_heartbeats()
        behind = [r for r in range(self.size) if self.seen[r] < self.arrived]
        silent = [r for r in range(self.size) if r != self.rank and time.monotonic() - self.heard[r] > 3 * self.ping_s]
        where = f"{what} of step {self.step + 1}" if self.step >= 0 else what
        if behind:
            who = f"rank(s) {', '.join(map(str, behind))} did not come to it (dead, hung, or far slower)"
        elif silent:
            who = f"rank(s) {', '.join(map(str, silent))} came to it, then stopped answering (dead or hung)"
        else:
            who = "every rank came to it and is still waiting (an MPI fault)"
        self.abort(f"rank {self.rank}: {where} got no answer within {self.timeout_s:g} s: {who}")

    def abort(self, message: str) -> None:
        print(f"pyllm distributed: {message}; ending the job", file=sys.stderr, flush=True)
        self.comm.Abort(3)

    # ------------------------------------------------------------------ collectives

    def allreduce(self, array: np.ndarray, what: str = "all-reduce") -> np.ndarray:
        self.wait(self.start_allreduce([array]), what)
        return array

    def start_allreduce(self, parts: list[np.ndarray]) -> list:
        """Non-blocking in-place sums of each (contiguous) part; the requests to test or wait for."""
        return [self.comm.Iallreduce(self.MPI.IN_PLACE, p, op=self.MPI.SUM) for p in parts]

    def sum(self, values: Sequence[float], what: str = "sum") -> list[float]:
        buf = np.asarray(values, np.float64).copy()
        self.allreduce(buf, what)
        return [float(v) for v in buf]

    def broadcast(self, array: np.ndarray, what: str = "broadcast") -> np.ndarray:
        self.wait([self.comm.Ibcast(array, root=0)], what)
        return array

    def broadcast_array(self, array: Optional[np.ndarray], what: str = "broadcast") -> np.ndarray:
        header = self.broadcast_json({"shape": list(array.shape), "dtype": array.dtype.str}
                                     if self.is_root else None, what)
        if not self.is_root:
            array = np.empty(header["shape"], np.dtype(header["dtype"]))
        flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        for start in range(0, flat.size, 1 << 30):   # counts are C ints: pieces under 2 GiB
            self.broadcast(flat[start:start + (1 << 30)], what)
        return flat.view(array.dtype).reshape(array.shape) if not self.is_root else array

    def broadcast_json(self, value, what: str = "broadcast"):
        data = np.frombuffer(json.dumps(value).encode(), np.uint8).copy() if self.is_root else None
        size = np.array([data.size if data is not None else 0], np.int64)
        self.broadcast(size, what)
        if not self.is_root:
            data = np.empty(int(size[0]), np.uint8)
        self.broadcast(data, what)
        return json.loads(data.tobytes().decode())

    def root_first(self, fn: Callable[[], object], what: str):
        outcome, result = {"ok": True}, None
        if self.is_root:
            try:
                result = fn()
            except Exception as exc:   # noqa: BLE001 - re-raised below, on every rank
                outcome = {"ok": False, "type": type(exc).__name__, "message": str(exc)}
                error = exc
        outcome = self.broadcast_json(outcome if self.is_root else None, what)
        if not outcome["ok"]:
            if self.is_root:
                raise error
            kind = {"ValueError": ValueError, "FileNotFoundError": FileNotFoundError, "FileExistsError": FileExistsError,
                    "TypeError": TypeError, "OSError": OSError}.get(outcome["type"], DistributedError)
            exc = kind(f"{outcome['message']} (on rank 0)")
            exc.quiet = True   # rank 0 says it; the others stop with it
            raise exc
        return result

    def barrier(self, what: str = "barrier") -> None:
        self.wait([self.comm.Ibarrier()], what)

    def reduce_scatter(self, grads: np.ndarray, shard: np.ndarray, counts: list[int], what: str) -> None:
        self.wait([self.comm.Ireduce_scatter(grads, shard, counts, op=self.MPI.SUM)], what)

    def allgather(self, array: np.ndarray, counts: list[int], what: str) -> None:
        offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int).tolist()
        self.wait([self.comm.Iallgatherv(self.MPI.IN_PLACE, [array, (counts, offsets)])], what)

    def gather(self, shard: np.ndarray, counts: list[int], what: str) -> Optional[np.ndarray]:
        offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int).tolist()
        full = np.empty(sum(counts), shard.dtype) if self.is_root else None
        recv = [full, (counts, offsets)] if self.is_root else None
        self.wait([self.comm.Igatherv(shard, recv, root=0)], what)
        return full

    def scatter(self, full: Optional[np.ndarray], shard: np.ndarray, counts: list[int], what: str) -> None:
        offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int).tolist()
        send = [full, (counts, offsets)] if self.is_root else None
        self.wait([self.comm.Iscatterv(send, shard, root=0)], what)


# ----------------------------------------------------------------------------- gradient buckets

def layer_groups(model) -> tuple[list[list[tuple[int, int]]], list[tuple[int, int]]]:
    """The flat gradient buffer's ranges of each layer ((offset, size) pairs, adjacent ones merged)
    and of everything outside the layers (embeddings, final norm, head): what backward finishes
    layer by layer, last layer first, and what it finishes only at its end."""
    per_layer: list[list[tuple[int, int]]] = [[] for _ in range(model.config.n_layer)]
    rest: list[tuple[int, int]] = []
    for spec in model.specs:
        size = math.prod(spec.shape)
        match = LAYER_OF.search(spec.name)   # Hugging Face names: model.layers.3., transformer.h.3.
        (per_layer[int(match.group(1))] if match else rest).append((model.offsets[spec.name], size))
    return [_merged(ranges) for ranges in per_layer], _merged(rest)


def _merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, size in sorted(ranges):
        if out and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], out[-1][1] + size)
        else:
            out.append((start, size))
    return out


class Buckets:
    """The gradient all-reduce of one step, in buckets: backward calls `layer_done(i)` after each
    layer; once the layers done since the last bucket hold bucket_bytes, their ranges are summed with
    a non-blocking all-reduce while backward goes on (earlier ones tested meanwhile, which lets MPI
    progress them); `finish()` sends what is left (embeddings, final norm, head) and waits for all.
    The sum is the same as one all-reduce of the whole buffer: each value is summed once."""

    def __init__(self, world: World, grads: np.ndarray, groups: tuple, bucket_bytes: int = BUCKET_BYTES) -> None:
        self.world, self.grads = world, grads
        self.per_layer, self.rest = groups
        self.bucket_bytes = bucket_bytes
        self.pending: list[tuple[int, int]] = []
        self.requests: list = []
        self.started: list[list[tuple[int, int]]] = []   # the ranges of each bucket, for tests and the log
        self.wait_s = 0.0                                # time spent waiting in finish()

    def _start(self, ranges: list[tuple[int, int]]) -> None:
        ranges = _merged(ranges)
        if ranges:
            self.started.append(ranges)
            self.requests += self.world.start_allreduce([self.grads[s:s + n] for s, n in ranges])

    def layer_done(self, layer: int) -> None:
        self.pending += self.per_layer[layer]
        if sum(n for _, n in self.pending) * self.grads.itemsize >= self.bucket_bytes:
            self._start(self.pending)
            self.pending = []
        self.world.test(self.requests)

    def finish(self) -> float:
        """Sends what is left, waits for every bucket; the seconds spent waiting."""
        self._start(self.pending + self.rest)
        self.pending = []
        t0 = time.perf_counter()
        self.world.wait(self.requests, "the gradient all-reduce")
        self.wait_s = time.perf_counter() - t0
        self.requests = []
        return self.wait_s


# ----------------------------------------------------------------------------- ZeRO-1

def shard_counts(total: int, size: int, align: int = 16) -> list[int]:
    """Values per rank of a flat buffer of `total` split in `size` contiguous shards (all but the last
    a multiple of `align` values long, so each rank's vector loops start aligned)."""
    per = -(-total // size)
    per = -(-per // align) * align
    counts, start = [], 0
    for _ in range(size):
        n = max(0, min(per, total - start))
        counts.append(n)
        start += n
    return counts


class ShardedAdamW(AdamW):
    """ZeRO-1: AdamW whose moments are split across the ranks. A step reduce-scatters the summed
    gradients (each rank receives its shard's), clips by the global norm (the shards' squares
    summed), updates its shard of the parameters with its shard of m and v, and all-gathers the
    parameters, so every rank again holds the whole model. The same update as AdamW on the summed
    gradients, in 1/N of the optimizer memory."""

    def __init__(self, model, world: World, **options) -> None:
        self.world = world
        self.counts = shard_counts(model.params.size, world.size)
        self.start = sum(self.counts[:world.rank])
        self.stop = self.start + self.counts[world.rank]
        super().__init__(_ShardView(model, self.start, self.stop), **options)
        self.full_model = model
        self.shard_grads = np.zeros(self.counts[world.rank], np.float32)
        self.model.grads = self.shard_grads
        self.comm_s = 0.0   # the last step's time in the reduce-scatter, the norm and the all-gather

    def step(self, lr: float | None = None) -> None:
        t0 = time.perf_counter()
        self.world.reduce_scatter(self.full_model.grads, self.shard_grads, self.counts, "the gradient reduce-scatter")
        squares = float(np.einsum("i,i->", self.shard_grads, self.shard_grads, dtype=np.float64))
        total = self.world.sum([squares], "the gradient norm")[0]
        self._norm = math.sqrt(total)
        self.comm_s = time.perf_counter() - t0
        super().step(lr)
        t0 = time.perf_counter()
        self.world.allgather(self.full_model.params, self.counts, "the parameter all-gather")
        self.comm_s += time.perf_counter() - t0

    def _grad_norm(self) -> float:
        return self._norm

    def full_moments(self) -> tuple[Optional[np.ndarray], Optional[np.ndarray]]:
        """(m, v) of the whole model on rank 0 (None elsewhere): what a checkpoint keeps, so it resumes
        with any number of ranks. Every rank must call it."""
        return (self.world.gather(self.m, self.counts, "the moments' gather"),
                self.world.gather(self.v, self.counts, "the moments' gather"))

    def load_full_moments(self, m: Optional[np.ndarray], v: Optional[np.ndarray], step: int) -> None:
        """Each rank's shard of whole-model moments that rank 0 holds."""
        self.world.scatter(m, self.m, self.counts, "the moments' scatter")
        self.world.scatter(v, self.v, self.counts, "the moments' scatter")
        self.step_count = int(step)


class _ShardView:
    """What AdamW reads of a model (params, grads, num_decayed), narrowed to [start, stop)."""

    def __init__(self, model, start: int, stop: int) -> None:
        self.params = model.params[start:stop]
        self.grads = model.grads[start:stop]
        self.num_decayed = int(np.clip(model.num_decayed - start, 0, stop - start))


def threads_per_rank(world: World, asked: Optional[int]) -> Optional[int]:
    """The kernel threads each rank should run: what was asked, else the cores shared out among the
    ranks on this machine (None: leave the default)."""
    if asked:
        return asked
    if world.size == 1:
        return None
    return max(1, (os.cpu_count() or 1) // world.local_size)
