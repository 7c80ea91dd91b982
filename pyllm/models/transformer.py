"""Transformer: a decoder-only model's parameters and its three ways to run (training forward and
backward, the cached decode step), over the shared block (blocks.py) of its architecture.

Float parameters live in `params` and gradients in `grads` (flat float32 buffers, decayed weights
first); `p` and `g` map Hugging Face names to views into them. Weights kept in a ggml block format
(`quantized`, from a GGUF file) live outside the buffers and are not trained; LoRA adapters
(`lora`) may train on top of them. Inputs are checked here, once, before any kernel runs.
Not files (pyllm.io, and pyllm.Model which adds them), sampling (pyllm.generate) or optimisation.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from pyllm import kernels
from pyllm.kernels import unchecked as fast
from pyllm.models.blocks import Architecture, Runner
from pyllm.models.cache import KVCache
from pyllm.models.config import ARCHITECTURES as ARCHITECTURE_NAMES
from pyllm.models.decode import build_plan
from pyllm.models.config import ModelConfig
from pyllm.models.gpt2 import GPT2
from pyllm.models.layers import Projection
from pyllm.models.llama import Llama
from pyllm.models.gemma import Gemma3
from pyllm.models.qwen import Qwen2, Qwen3
from pyllm.models.params import ParamSpec, QuantizedWeight, flat_views, initialise, offsets
from pyllm.models.workspace import Workspace

ARCHITECTURES: dict[str, Architecture] = {arch.name: arch for arch in (GPT2(), Llama(), Qwen2(), Qwen3(), Gemma3())}
assert tuple(ARCHITECTURES) == ARCHITECTURE_NAMES, "models/config.py lists the architectures written here"

IGNORE = -100   # a target that is not learned (a prompt, padding)
STEP_OPERATIONS = tuple(kernels.DecodePlan.operations)   # what forward_step's profile counts, in order


@dataclass
class Inspection:
    """What Transformer.inspect kept of one forward pass over T positions."""

    logits: np.ndarray              # (T, vocab): the next-token logits after each position
    attention: list[np.ndarray]     # per layer (n_head, T, T): each row a causal distribution
    residuals: list[np.ndarray]     # per layer (T, n_embd): the residual stream after it


class _Buffers(threading.local):
    """Each thread's own activation buffers: two threads may run one model (a server's requests)."""

    def __init__(self) -> None:
        self.train, self.scratch = Workspace(), Workspace()


def parameter_specs(cfg: ModelConfig) -> list[ParamSpec]:
    """Every parameter of a model of this config with its Hugging Face name, decayed ones first."""
    return ARCHITECTURES[cfg.arch].parameter_specs(cfg)


def hf_norm_offsets(cfg: ModelConfig) -> dict[str, float]:
    """Parameter name -> what Hugging Face's files store less than pyllm keeps (Gemma's norms,
    (1 + w) in its RMSNorm: pyllm keeps 1 + w)."""
    return ARCHITECTURES[cfg.arch].norm_offsets(cfg)


def in_out_weights(layers: list) -> set[str]:
    """The matrices of these layers stored (in, out) (GPT-2's Conv1D) rather than (out, in)."""
    return {p.weight for layer in layers for p in (layer.qkv, layer.o) + layer.mlp if p.in_out}


def stored_in_out(cfg: ModelConfig) -> set[str]:
    """in_out_weights of a model of this config: what a reader of (out, in) files transposes."""
    return in_out_weights(ARCHITECTURES[cfg.arch].layers(cfg))


class Transformer:
    """A GPT-style decoder-only transformer with hand-written backward passes over the C++ kernels."""

    def __init__(self, config: ModelConfig, seed: Optional[int] = 0,
                 quantized: Optional[dict[str, QuantizedWeight]] = None) -> None:
        self.config = config
        self.arch = ARCHITECTURES[config.arch]
        self.runner = Runner(config, self.arch)
        self.quantized: dict[str, QuantizedWeight] = dict(quantized or {})
        # Products with quantized weights round the activations to int8 first, as llama.cpp does.
        self.int8_activations = True
        # What generation's KV caches hold: with quantized weights float16, as llama.cpp's default
        # cache (half the bytes each decode step reads); float models keep their values exactly.
        self.kv_dtype = np.float16 if self.quantized else np.float32
        self.lora = None   # pyllm.lora.LoRA adapters, when attached (the base is then frozen)
        layers = self.runner.layers
        self._in_out = in_out_weights(layers)
        self._fused = {layer.qkv.weight: layer.qkv for layer in layers if layer.qkv.parts}
        all_specs = self.arch.parameter_specs(config)
        self._check_quantized(all_specs)
        self._pack_quantized()
        self.specs = [s for s in all_specs if s.name not in self.quantized]
        self.num_params = sum(math.prod(s.shape) for s in self.specs)
        self.num_decayed = sum(math.prod(s.shape) for s in self.specs if s.decay)
        self.params = np.empty(self.num_params, np.float32)
        self.grads = np.zeros(self.num_params, np.float32)
        self.offsets = offsets(self.specs)
        self.p = flat_views(self.params, self.specs)
        self.g = flat_views(self.grads, self.specs)
        # Fused projections whose parts are float: one view over their adjacent rows.
        self._fused_weights, self._fused_grads = {}, {}
        for proj in self._fused.values():
            if proj.parts[0][0] in self.p:
                start = self.offsets[proj.parts[0][0]]
                size = proj.out * proj.inp
                self._fused_weights[proj.weight] = self.params[start:start + size].reshape(proj.out, proj.inp)
                self._fused_grads[proj.weight] = self.grads[start:start + size].reshape(proj.out, proj.inp)
        # Fused biases (q, k and v's of Qwen2): one view over the adjacent parts.
        self._fused_biases, self._fused_bias_grads = {}, {}
        for proj in self._fused.values():
            if proj.bias_parts:
                start = self.offsets[proj.bias_parts[0]]
                ends = [self.offsets[b] + self.p[b].size for b in proj.bias_parts]
                assert ends[-1] - start == proj.out and all(self.offsets[b] == e for b, e in
                                                            zip(proj.bias_parts[1:], ends)), "fused biases are adjacent"
                self._fused_biases[proj.bias] = self.params[start:start + proj.out]
                self._fused_bias_grads[proj.bias] = self.grads[start:start + proj.out]
        self._buffers = _Buffers()
        self._rope: Optional[tuple] = None
        self._plan, self._plan_key = None, None
        if seed is not None:   # None: weights to be loaded (zeros until then)
            initialise(self.p, self.specs, seed, config.n_layer)
        else:
            self.params.fill(0.0)

    # ------------------------------------------------------------------ what the layers read

    @property
    def frozen(self) -> bool:
        """Adapters train: no base weight gets a gradient."""
        return self.lora is not None

    def float_weight(self, proj: Projection) -> np.ndarray:
        return self._fused_weights[proj.weight] if proj.parts else self.p[proj.weight]

    def float_grad(self, proj: Projection) -> Optional[np.ndarray]:
        if self.frozen:
            return None
        return self._fused_grads[proj.weight] if proj.parts else self.g[proj.weight]

    def bias(self, proj: Projection) -> Optional[np.ndarray]:
        if proj.bias is None:
            return None
        return self._fused_biases[proj.bias] if proj.bias_parts else self.p[proj.bias]

    def bias_grad(self, proj: Projection) -> Optional[np.ndarray]:
        if self.frozen or proj.bias is None:
            return None
        return self._fused_bias_grads[proj.bias] if proj.bias_parts else self.g[proj.bias]

    def scratch(self, name: str, shape: tuple) -> np.ndarray:
        return self._buffers.scratch.get(name, shape)

    def _rope_tables(self, length: int) -> Optional[tuple]:
        """((cos, sin) of the global layers, (cos, sin) of the local ones), covering positions
        0 .. length-1 at least; the same pair twice without local layers (None without rotary
        embeddings)."""
        if not self.arch.rotary:
            return None
        tables = self._rope
        if tables is None or tables[0][0].shape[0] < length:   # grown geometrically, up to the context
            have = 0 if tables is None else tables[0][0].shape[0]
            size = max(length, min(self.config.block_size, max(4096, 2 * have)))
            cfg = self.config
            full = kernels.rope_tables(size, cfg.head_size, cfg.rope_theta, cfg.rope_freq_factors())
            local = full
            if any(cfg.layer_is_local(i) for i in range(cfg.n_layer)):
                local = kernels.rope_tables(size, cfg.head_size, cfg.rope_local_theta or cfg.rope_theta)
            tables = self._rope = (full, local)
        return tables

    def _pack_quantized(self) -> None:
        """Every quantized weight whose type has a packed layout, packed (a copy: the file's own bytes
        are then no longer read); the parts of a fused q/k/v as row ranges of the packed whole where
        they start and end on its groups of rows (else each part is packed on its own)."""
        for name in list(self.quantized):
            self.quantized[name] = self.quantized[name].to_packed()
        for proj in self._fused.values():
            whole = self.quantized.get(proj.weight)
            if whole is None or not whole.packed:
                continue
            group = kernels.PACKED_ROWS
            if all(cols.start % group == 0 and (cols.stop % group == 0 or cols.stop == proj.out)
                   for _, cols in proj.parts):
                for part, cols in proj.parts:
                    self.quantized[part] = QuantizedWeight(whole.data[cols], whole.ggml_type,
                                                           (cols.stop - cols.start, proj.inp), True)

    def _check_quantized(self, specs: list[ParamSpec]) -> None:
        """Every quantized weight names a parameter (or a fused projection) and fits its shape."""
        shapes, fused = {s.name: s.shape for s in specs}, self._fused
        # What may stay in blocks: what is multiplied (projections, the head) or looked up by row (the
        # token embedding); not what is added (norms, biases, GPT-2's position table).
        kept = {self.arch.embedding, self.runner.head.weight}
        for layer in self.runner.layers:
            for proj in (layer.qkv, layer.o) + layer.mlp:
                kept |= {proj.weight} | {name for name, _ in proj.parts}
        for name, weight in self.quantized.items():
            if name not in kept:
                raise ValueError(f"{name!r} cannot be kept quantized in a {self.config.arch} model (only its "
                                 f"matrices and token embedding can)")
            if name in fused:
                need = (fused[name].out, fused[name].inp)
            else:
                need = tuple(reversed(shapes[name])) if name in self._in_out else tuple(shapes[name])
            if len(need) != 2 or tuple(weight.shape) != need:
                raise ValueError(f"the quantized tensor for {name} is {tuple(weight.shape)}; the config's sizes "
                                 f"need {need} (rows of outputs, columns of inputs)")
            t = kernels.GGML_TYPES.get(weight.ggml_type)
            if t is None or not t.quantized or need[1] % t.block_values or weight.data.dtype != np.uint8 or \
                    weight.data.shape != (need[0], kernels.row_bytes(weight.ggml_type, need[1])):
                raise ValueError(f"the quantized tensor for {name} has rows that do not fit its shape {need}")
        for proj in fused.values():
            kept = [part in self.quantized for part, _ in proj.parts]
            if any(kept) and not all(kept):
                raise ValueError(f"{proj.weight}: q, k and v must all be quantized or all be float")

    # ------------------------------------------------------------------ parameters

    def state_dict(self) -> dict[str, np.ndarray]:
        """Name -> parameter array (views into the flat buffer), Hugging Face names and shapes;
        quantized weights are dequantized (copies)."""
        state = dict(self.p)
        for name in self._quantized_names():
            state[name] = self._dequantized(name)
        return state

    def _quantized_names(self) -> list[str]:
        """The state_dict names kept quantized (a fused projection as its parts)."""
        return [name for name in self.quantized if name not in self._fused]

    def _dequantized(self, name: str) -> np.ndarray:
        values = self.quantized[name].dequantize()
        return np.ascontiguousarray(values.T) if name in self._in_out else values

    def release_buffers(self) -> None:
        """Drops this thread's activation buffers (kept between steps of one shape: a training batch's
        are hundreds of MB); the next forward allocates them again."""
        self._buffers = _Buffers()

    def dequantized(self) -> "Transformer":
        """This model with every weight in float32 (itself when nothing is quantized), expanded one
        tensor at a time into the new model's buffer: the peak is the new model, not a second copy."""
        if not self.quantized:
            return self
        model = type(self)(self.config, seed=None)
        for name, view in self.p.items():
            model.p[name][...] = view
        for name in self._quantized_names():
            model.p[name][...] = self._dequantized(name)
        return model

    def bytes_per_token(self, context: int) -> int:
        """The bytes one decode step reads at `context` cached positions: every weight it multiplies
        once (quantized ones in their blocks), one row of each table it looks up, and the keys and
        values its layers see (a sliding layer's window at most) in the cache's dtype. A decode step runs at most at the memory bandwidth divided by this."""
        cfg = self.config
        fused_parts = {part for proj in self._fused.values() if proj.weight in self.quantized
                       for part, _ in proj.parts}
        total = sum(q.data.nbytes for name, q in self.quantized.items() if name not in fused_parts)
        looked_up = [self.arch.embedding] if self.arch.embedding != self.runner.head.weight else []
        if self.arch.positions is not None:
            looked_up.append(self.arch.positions)
        for name, view in self.p.items():
            total += view.nbytes // view.shape[0] if name in looked_up else view.nbytes
        if self.arch.embedding in self.quantized and self.arch.embedding != self.runner.head.weight:
            table = self.quantized[self.arch.embedding]
            total -= table.data.nbytes - table.data.nbytes // table.shape[0]
        seen = sum(min(int(context), cfg.layer_window(i) or int(context)) for i in range(cfg.n_layer))
        kv = 2 * seen * cfg.n_kv_head * cfg.head_size * np.dtype(self.kv_dtype).itemsize
        return int(total + kv)

    def named_grads(self) -> dict[str, np.ndarray]:
        """Name -> gradient array, same keys and shapes as state_dict()."""
        return dict(self.g)

    def load_state_dict(self, state, strict: bool = True) -> None:
        """Copies arrays into the parameters, checking names and shapes. `state` is a mapping of
        name -> array; a lazy one (a file reader's) is read one tensor at a time."""
        names = list(state)    # the keys only: a lazy mapping reads nothing yet
        present = set(names)
        missing = [name for name in self.p if name not in present]
        unexpected = [name for name in names if name not in self.p]
        if strict and (missing or unexpected):
            raise ValueError(f"state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for name in self.p:
            if name not in present:
                continue
            value = np.asarray(state[name])
            if value.shape != self.p[name].shape:
                raise ValueError(f"{name}: shape {value.shape}, the model needs {self.p[name].shape}")
            self.p[name][...] = value

    def zero_grad(self) -> None:
        self.grads.fill(0.0)

    # ------------------------------------------------------------------ checks

    def _check_ids(self, ids, name: str = "ids") -> np.ndarray:
        ids = np.asarray(ids)
        if ids.ndim == 1:
            ids = ids[None, :]
        if ids.ndim != 2 or ids.dtype.kind not in "iu":
            raise ValueError(f"{name} must be integers shaped (B, T) or (T,), got {ids.dtype} {ids.shape}")
        B, T = ids.shape
        if T < 1 or B < 1:
            raise ValueError(f"{name} is empty: shape {ids.shape}")
        if T > self.config.block_size:
            raise ValueError(f"{name} has {T} positions; the model's block_size is {self.config.block_size}")
        if ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise ValueError(f"{name} holds ids outside [0, {self.config.vocab_size})")
        return np.ascontiguousarray(ids, dtype=np.int64)

    def _check_targets(self, targets, shape: tuple) -> np.ndarray:
        targets = np.asarray(targets)
        if targets.ndim == 1 and shape[0] == 1:
            targets = targets[None, :]
        if targets.shape != shape or targets.dtype.kind not in "iu":
            raise ValueError(f"targets must be integers shaped {shape}, got {targets.dtype} {targets.shape}")
        bad = (targets != IGNORE) & ((targets < 0) | (targets >= self.config.vocab_size))
        if bad.any():
            raise ValueError(f"targets hold ids outside [0, {self.config.vocab_size}) (other than {IGNORE})")
        return np.ascontiguousarray(targets, dtype=np.int64)

    # ------------------------------------------------------------------ forward / backward

    def _forward(self, ids: np.ndarray, rows: Optional[np.ndarray] = None) -> np.ndarray:
        return self.runner.forward(self, self._buffers.train, ids, self._rope_tables(ids.shape[1]), rows)

    def __call__(self, ids) -> np.ndarray:
        """Logits (B, T, vocab) for token ids (B, T) or (T,) -> (1, T, vocab)."""
        return self._forward(self._check_ids(ids)).copy()

    def hidden_states(self, ids) -> np.ndarray:
        """The last layer's output after the final norm (what the head multiplies), (B, T, n_embd):
        what an embedding of the text is pooled from."""
        ids = self._check_ids(ids)
        return self.runner.forward(self, self._buffers.train, ids, self._rope_tables(ids.shape[1]),
                                   head=False).copy()

    def inspect(self, ids, attention: bool = True) -> "Inspection":
        """One sequence (T,) run through the model with what happens inside kept: the logits at
        every position, each layer's attention weights (from the attention kernel) and the residual
        stream after each layer (what the logit lens reads, through lens_logits)."""
        ids = self._check_ids(ids)
        if ids.shape[0] != 1:
            raise ValueError(f"inspect takes one sequence, got a batch of {ids.shape[0]}")
        maps: Optional[list] = [] if attention else None
        ws = self._buffers.train
        logits = self.runner.forward(self, ws, ids, self._rope_tables(ids.shape[1]), attention_maps=maps)
        T, C = ids.shape[1], self.config.n_embd
        residuals = [ws.get(f"x{i + 1}", (T, C)).copy() for i in range(self.config.n_layer)]
        return Inspection(logits[0].copy(), [m[0] for m in maps] if maps is not None else [], residuals)

    def lens_logits(self, residual) -> np.ndarray:
        """Logits (N, V) of residual-stream rows (N, C) through the final norm and the head (the
        logit lens): what the model would predict if the layers after them were skipped."""
        x = np.asarray(residual, np.float32)
        if x.ndim != 2 or x.shape[1] != self.config.n_embd or not x.shape[0]:
            raise ValueError(f"residual must be (N >= 1, {self.config.n_embd}), got {x.shape}")
        return self.runner.head_logits(self, self._buffers.scratch, x).copy()

    @staticmethod
    def _learned_rows(flat_targets: np.ndarray) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """(positions whose target is learned, the rows to compute logits for: those, when at least a
        tenth of the targets are ignored (fine-tuning prompts), else None for all)."""
        learned = np.flatnonzero(flat_targets != IGNORE)
        return learned, (learned if 0 < learned.size < 0.9 * flat_targets.size else None)

    def loss(self, ids, targets) -> float:
        """Mean next-token cross-entropy of targets (ignore_index -100) given ids."""
        ids = self._check_ids(ids)
        targets = self._check_targets(targets, ids.shape).reshape(-1)
        learned, rows = self._learned_rows(targets)
        if not learned.size:
            return 0.0
        logits = self._forward(ids, rows).reshape(-1, self.config.vocab_size)
        return float(kernels.cross_entropy(logits, targets[rows] if rows is not None else targets))

    def forward_backward(self, ids, targets, loss_scale: float = 1.0,
                         layer_done: Optional[Callable[[int], None]] = None) -> float:
        """Mean loss; adds d(loss_scale * loss)/d(param) into the gradients (so micro-batches accumulate).
        layer_done(i) is called as soon as layer i's gradients are complete (see Runner.backward)."""
        if self.quantized and self.lora is None:
            raise ValueError("this model keeps quantized weights, which cannot be trained: attach LoRA "
                             "adapters (pyllm.lora) or load it with dequantize=True")
        ids = self._check_ids(ids)
        flat_targets = self._check_targets(targets, ids.shape).reshape(-1)
        learned, rows = self._learned_rows(flat_targets)
        if rows is not None:
            flat_targets = np.ascontiguousarray(flat_targets[rows])
        N, V = flat_targets.size, self.config.vocab_size
        logits = self._forward(ids, rows).reshape(N, V)
        ws = self._buffers.train
        losses, lse = ws.get("losses", (N,)), ws.get("lse", (N,))
        fast.cross_entropy_forward(losses, lse, logits, flat_targets, N, V, IGNORE)
        count = int(learned.size)
        loss = float(losses.sum(dtype=np.float64) / count) if count else 0.0
        scale = float(loss_scale) / count if count else 0.0
        fast.cross_entropy_backward(logits, logits, lse, flat_targets, scale, N, V, IGNORE)  # in place
        self.runner.backward(self, None if self.frozen else self.g, ws, ids, logits,
                             self._rope_tables(ids.shape[1]), rows, layer_done)
        return loss

    def forward_step(self, ids, cache: KVCache, rows=None, counts=None,
                     profile: Optional[np.ndarray] = None) -> np.ndarray:
        """Appends ids (B, Tq) to the KV cache and returns the logits of each row's last new
        position, (B, vocab). Batch row b goes to cache row rows[b]: rows is a slice or a sequence of
        distinct cache rows in any order (a continuous batch's), default all of them. Rows may hold
        different lengths (ragged batch): each new token sits at its own row's next position.
        counts (B,), if given, says how many of each row's ids are real (a batch of prompts of
        different lengths, right-padded to Tq): the logits are then those of position counts[b] - 1,
        and the row grows by counts[b]. profile, a float64 array with an entry per STEP_OPERATIONS,
        gets each operation's nanoseconds added."""
        cfg = self.config
        rows = self._cache_rows(rows, cache)
        lengths = cache.lengths[rows]
        ids = np.asarray(ids)
        if ids.ndim != 2 or ids.dtype.kind not in "iu" or ids.shape[1] < 1 or ids.shape[0] != lengths.size \
                or not lengths.size:
            raise ValueError(f"ids must be integers shaped ({lengths.size}, Tq >= 1), got {ids.dtype} {ids.shape}")
        if ids.min() < 0 or ids.max() >= cfg.vocab_size:
            raise ValueError(f"ids outside [0, {cfg.vocab_size})")
        ids = np.ascontiguousarray(ids, np.int64)
        B, Tq = ids.shape
        if int(lengths.max()) + Tq > cache.capacity:
            raise ValueError(f"the KV cache holds {cache.capacity} positions; {int(lengths.max()) + Tq} needed")
        if counts is not None:
            counts = np.asarray(counts)
            if counts.shape != (B,) or counts.dtype.kind not in "iu" or counts.min() < 1 or counts.max() > Tq:
                raise ValueError(f"counts must be (B={B},) integers in [1, Tq={Tq}], got {counts!r}")
            counts = counts.astype(np.int64)
        limit = cache.step_limit
        if limit is not None and Tq > limit:
            return self._forward_in_pieces(ids, cache, rows, counts, profile, limit)
        return self._step(ids, cache, rows, lengths, counts, profile)

    def _step(self, ids: np.ndarray, cache: KVCache, rows: np.ndarray, lengths: np.ndarray,
              counts: Optional[np.ndarray], profile: Optional[np.ndarray]) -> np.ndarray:
        """forward_step on checked inputs, in one pass of the C++ step."""
        B, Tq = ids.shape
        rope = self._rope_tables(int(lengths.max()) + Tq)
        window = None
        if cache.k_window is not None:
            cache.make_room(rows, Tq)
            window = (cache.k_window, cache.v_window, lengths - cache.starts[rows], cache.layer_slots)
        logits = np.empty((B, self.config.vocab_size), np.float32)
        self._decode_plan().step(logits, ids, counts, lengths, cache.k_all, cache.v_all, rows,
                                 *(rope[0] + rope[1] if rope is not None else (None,) * 4), window, profile)
        cache.lengths[rows] = lengths + (counts if counts is not None else Tq)
        return logits

    def _forward_in_pieces(self, ids: np.ndarray, cache: KVCache, rows: np.ndarray, counts: Optional[np.ndarray],
                           profile: Optional[np.ndarray], limit: int) -> np.ndarray:
        """forward_step of more new positions than the cache's window buffers take at once: pieces
        of `limit` columns, each row taking part while it has real ids left; each row's logits
        from the piece holding its last one."""
        B, Tq = ids.shape
        counts = np.full(B, Tq, np.int64) if counts is None else counts
        logits = np.empty((B, self.config.vocab_size), np.float32)
        for start in range(0, Tq, limit):
            stop = min(Tq, start + limit)
            piece = np.clip(counts - start, 0, stop - start)
            live = np.flatnonzero(piece > 0)
            if not live.size:
                break
            sub_counts = piece[live]
            out = self._step(np.ascontiguousarray(ids[live, start:stop]), cache, rows[live], cache.lengths[rows[live]],
                             None if (sub_counts == stop - start).all() else sub_counts, profile)
            last = (counts[live] - 1 >= start) & (counts[live] - 1 < stop)
            logits[live[last]] = out[last]
        return logits

    @staticmethod
    def _cache_rows(rows, cache: KVCache) -> np.ndarray:
        """The cache rows of a step as distinct int64 indices (a slice, a sequence, or all)."""
        if rows is None:
            return np.arange(cache.batch, dtype=np.int64)
        if isinstance(rows, slice):
            picked = np.arange(cache.batch, dtype=np.int64)[rows]
        else:
            picked = np.asarray(rows)
            if picked.ndim != 1 or picked.dtype.kind not in "iu":
                raise ValueError(f"rows must be a slice or a sequence of cache row indices, got {rows!r}")
            picked = np.ascontiguousarray(picked, np.int64)
        if not picked.size:
            raise ValueError("rows selects no cache row")
        if picked.min() < 0 or picked.max() >= cache.batch or np.unique(picked).size != picked.size:
            raise ValueError(f"rows must be distinct rows of the cache's {cache.batch}, got {rows!r}")
        return picked

    def _decode_plan(self):
        """The C++ decode plan, built on first use and again when what it points at changed."""
        key = (id(self.lora), self.int8_activations)
        if self._plan_key != key:
            self._plan, self._plan_key = build_plan(self, self.runner, self.arch), key
        return self._plan

    def __repr__(self) -> str:
        c = self.config
        quantized = sum(math.prod(q.shape) for n, q in self.quantized.items() if n not in self._fused)
        size = f"{(self.num_params + quantized) / 1e6:.2f}M params" + (
            f" ({quantized / 1e6:.2f}M quantized)" if quantized else "")
        return (f"Model({c.arch}, {size}: n_layer={c.n_layer}, n_head={c.n_head}, "
                f"n_embd={c.n_embd}, block_size={c.block_size}, vocab_size={c.vocab_size})")
