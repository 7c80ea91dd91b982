"""The Llama family for pyllm.Model: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU.

Parameter names and shapes are Hugging Face's LlamaForCausalLM (linear weights are (out, in), so
every product is x @ W^T, a transposed-operand matmul). q_proj, k_proj and v_proj sit next to each
other in the flat parameter buffer, so the three projections run as one matmul over their
concatenation. Model (model.py) calls these for config.arch == "llama".
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import numpy as np

from pyllm.kernels import _C
from pyllm.reference import rope_tables

if TYPE_CHECKING:
    from pyllm.model import KVCache, Model, ModelConfig, ParamSpec


def parameter_specs(cfg: "ModelConfig") -> list["ParamSpec"]:
    from pyllm.model import ParamSpec

    C, F, HS = cfg.n_embd, cfg.intermediate_size, cfg.head_size
    q_out, kv_out = cfg.n_head * HS, cfg.n_kv_head * HS
    decayed, other = [], [ParamSpec("model.embed_tokens.weight", (cfg.vocab_size, C), False, "normal")]
    for i in range(cfg.n_layer):
        h = f"model.layers.{i}."
        decayed += [ParamSpec(h + "self_attn.q_proj.weight", (q_out, C), True, "normal"),
                    ParamSpec(h + "self_attn.k_proj.weight", (kv_out, C), True, "normal"),
                    ParamSpec(h + "self_attn.v_proj.weight", (kv_out, C), True, "normal"),
                    ParamSpec(h + "self_attn.o_proj.weight", (C, q_out), True, "residual"),
                    ParamSpec(h + "mlp.gate_proj.weight", (F, C), True, "normal"),
                    ParamSpec(h + "mlp.up_proj.weight", (F, C), True, "normal"),
                    ParamSpec(h + "mlp.down_proj.weight", (C, F), True, "residual")]
        other += [ParamSpec(h + "input_layernorm.weight", (C,), False, "ones"),
                  ParamSpec(h + "post_attention_layernorm.weight", (C,), False, "ones")]
    other.append(ParamSpec("model.norm.weight", (C,), False, "ones"))
    if not cfg.tie_word_embeddings:
        decayed.append(ParamSpec("lm_head.weight", (cfg.vocab_size, C), True, "normal"))
    return decayed + other


def _qkv_weight(model: "Model", i: int) -> np.ndarray:
    """q_proj, k_proj and v_proj of layer i as one ((NH + 2 NKV) HS, C) view (they are adjacent)."""
    return _qkv_view(model, model.params, i)


def _qkv_grad(model: "Model", i: int) -> np.ndarray:
    return _qkv_view(model, model.grads, i)


def _qkv_view(model: "Model", flat: np.ndarray, i: int) -> np.ndarray:
    cfg = model.config
    rows = (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_size
    start = model.offsets[f"model.layers.{i}.self_attn.q_proj.weight"]
    return flat[start:start + rows * cfg.n_embd].reshape(rows, cfg.n_embd)


def linear(model: "Model", out: np.ndarray, a: np.ndarray, name: str, M: int, K: int, N: int) -> None:
    """out (M, N) = a (M, K) @ W^T for the weight `name` (N, K): float32, or kept quantized
    (model.quantized); "....self_attn.qkv" is the fused q, k, v projection."""
    quantized = model.quantized.get(name)
    if quantized is not None:
        _C.matmul_quant(out, a, quantized.data, quantized.ggml_type, M, K, N, model.int8_activations)
        return
    if name.endswith(".self_attn.qkv") and name.replace("qkv", "q_proj.weight") in model.quantized:
        for part, cols in _qkv_parts(model, name):   # q, k, v quantized in different types
            piece = np.empty((M, cols.stop - cols.start), np.float32)
            linear(model, piece, a, part, M, K, piece.shape[1])
            out[:, cols] = piece
        return
    if name.endswith(".self_attn.qkv"):
        weight = _qkv_weight(model, int(name.split(".")[2]))
    else:
        weight = model.p[name]
    _C.matmul_forward(out, a, weight, None, M, K, N, True)


def linear_backward(model: "Model", dx: np.ndarray, weight_grad: Optional[np.ndarray], dout: np.ndarray,
                    a: np.ndarray, name: str, M: int, K: int, N: int) -> None:
    """dx (M, K) = dout (M, N) @ W and, unless weight_grad is None (a frozen base), weight_grad +=
    dout^T a, for the forward linear(out, a, name). A quantized weight is always frozen."""
    quantized = model.quantized.get(name)
    if quantized is not None or (name.endswith(".self_attn.qkv") and
                                 name.replace("qkv", "q_proj.weight") in model.quantized):
        if weight_grad is not None:
            raise ValueError(f"{name} is kept quantized and cannot be trained (train LoRA adapters on it)")
        if quantized is not None:
            _C.matmul_quant_backward(dx, dout, quantized.data, quantized.ggml_type, M, K, N)
            return
        dx.fill(0.0)
        part_dx = np.empty_like(dx)
        for part, cols in _qkv_parts(model, name):
            linear_backward(model, part_dx, None, np.ascontiguousarray(dout[:, cols]), a, part, M, K,
                            cols.stop - cols.start)
            dx += part_dx
        return
    if name.endswith(".self_attn.qkv"):
        weight = _qkv_weight(model, int(name.split(".")[2]))
    else:
        weight = model.p[name]
    _C.matmul_backward(dx, weight_grad, None, dout, a, weight, M, K, N, True)


def _qkv_parts(model: "Model", name: str) -> list[tuple[str, slice]]:
    """The q, k and v weights of the fused name "model.layers.i.self_attn.qkv" and their columns."""
    cfg = model.config
    nq, nkv = cfg.n_head * cfg.head_size, cfg.n_kv_head * cfg.head_size
    prefix = name[: -len("qkv")]
    return [(prefix + "q_proj.weight", slice(0, nq)), (prefix + "k_proj.weight", slice(nq, nq + nkv)),
            (prefix + "v_proj.weight", slice(nq + nkv, nq + 2 * nkv))]


def embed(model: "Model", out: np.ndarray, ids: np.ndarray) -> None:
    """out (N, C) = the token embedding rows of ids (N,)."""
    cfg, name = model.config, "model.embed_tokens.weight"
    quantized = model.quantized.get(name)
    ids = ids.reshape(-1)
    if quantized is None:
        _C.embedding_forward(out, ids, model.p[name], ids.size, cfg.vocab_size, cfg.n_embd)
    else:
        rows = np.ascontiguousarray(quantized.data[ids])
        _C.dequantize_rows(out, rows, quantized.ggml_type, ids.size, cfg.n_embd)


def _rope_cache(model: "Model", length: int) -> tuple[np.ndarray, np.ndarray]:
    tables = getattr(model, "_rope", None)
    if tables is None or tables[0].shape[0] < length:
        size = max(length, min(model.config.block_size, 4096))
        tables = model._rope = rope_tables(size, model.config.head_size, model.config.rope_theta)
    return tables


def _split_heads(qkv: np.ndarray, B: int, T: int, cfg, q, k, v) -> None:
    """(N, (NH + 2 NKV) HS) -> q (B, NH, T, HS), k and v (B, NKV, T, HS)."""
    NH, NKV, HS = cfg.n_head, cfg.n_kv_head, cfg.head_size
    rows = qkv.reshape(B, T, NH + 2 * NKV, HS)
    np.copyto(q, rows[:, :, :NH].transpose(0, 2, 1, 3))
    np.copyto(k, rows[:, :, NH:NH + NKV].transpose(0, 2, 1, 3))
    np.copyto(v, rows[:, :, NH + NKV:].transpose(0, 2, 1, 3))


def forward(model: "Model", ids: np.ndarray, rows: Optional[np.ndarray] = None) -> np.ndarray:
    """Logits (B, T, V), or with rows (flat positions) only theirs, (len(rows), V)."""
    cfg, p, ws = model.config, model.p, model._ws
    B, T = ids.shape
    C, NH, NKV, HS, F, V = cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.head_size, cfg.intermediate_size, cfg.vocab_size
    N, eps, QKV = B * T, cfg.norm_eps, (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_size
    cos, sin = (t[:T] for t in _rope_cache(model, T))
    cos, sin = np.ascontiguousarray(cos), np.ascontiguousarray(sin)
    ws.reset((B, T))
    x = ws.get("x0", (N, C))
    embed(model, x, ids)
    for i in range(cfg.n_layer):
        h = f"model.layers.{i}."
        ln1, r1 = ws.get(f"ln1.{i}", (N, C)), ws.get(f"ln1r.{i}", (N,))
        _C.rmsnorm_forward(ln1, r1, x, p[h + "input_layernorm.weight"], N, C, eps)
        qkv = ws.get("qkv", (N, QKV))
        linear(model, qkv, ln1, f"model.layers.{i}.self_attn.qkv", N, C, QKV)
        if model.lora is not None:
            nq, nkv = NH * HS, NKV * HS
            for name, cols in (("q", slice(0, nq)), ("k", slice(nq, nq + nkv)), ("v", slice(nq + nkv, QKV))):
                model.lora.forward(qkv, ln1, h + f"self_attn.{name}_proj.weight", cols)
        q0, k0 = ws.get("q0", (B, NH, T, HS)), ws.get("k0", (B, NKV, T, HS))
        v = ws.get(f"v.{i}", (B, NKV, T, HS))
        _split_heads(qkv, B, T, cfg, q0, k0, v)
        q, k = ws.get(f"q.{i}", (B, NH, T, HS)), ws.get(f"k.{i}", (B, NKV, T, HS))
        _C.rope_forward(q, q0, cos, sin, B * NH, T, HS)
        _C.rope_forward(k, k0, cos, sin, B * NKV, T, HS)
        att, lse = ws.get(f"att.{i}", (B, NH, T, HS)), ws.get(f"attlse.{i}", (B, NH, T))
        _C.attention_forward(att, lse, q, k, v, B, NH, NKV, T, T, HS, True, T, None)
        atty = ws.get(f"atty.{i}", (N, NH * HS))
        np.copyto(atty.reshape(B, T, NH, HS), att.transpose(0, 2, 1, 3))
        proj = ws.get("proj", (N, C))
        linear(model, proj, atty, h + "self_attn.o_proj.weight", N, NH * HS, C)
        if model.lora is not None:
            model.lora.forward(proj, atty, h + "self_attn.o_proj.weight")
        x_mid = ws.get(f"xmid.{i}", (N, C))
        np.add(x, proj, out=x_mid)
        ln2, r2 = ws.get(f"ln2.{i}", (N, C)), ws.get(f"ln2r.{i}", (N,))
        _C.rmsnorm_forward(ln2, r2, x_mid, p[h + "post_attention_layernorm.weight"], N, C, eps)
        gate, up = ws.get(f"gate.{i}", (N, F)), ws.get(f"up.{i}", (N, F))
        linear(model, gate, ln2, h + "mlp.gate_proj.weight", N, C, F)
        linear(model, up, ln2, h + "mlp.up_proj.weight", N, C, F)
        if model.lora is not None:
            model.lora.forward(gate, ln2, h + "mlp.gate_proj.weight")
            model.lora.forward(up, ln2, h + "mlp.up_proj.weight")
        act = ws.get(f"act.{i}", (N, F))
        _C.swiglu_forward(act, gate, up)
        linear(model, proj, act, h + "mlp.down_proj.weight", N, F, C)
        if model.lora is not None:
            model.lora.forward(proj, act, h + "mlp.down_proj.weight")
        x = ws.get(f"x{i + 1}", (N, C))
        np.add(x_mid, proj, out=x)
    lnf, rf = ws.get("lnf", (N, C)), ws.get("lnfr", (N,))
    _C.rmsnorm_forward(lnf, rf, x, p["model.norm.weight"], N, C, eps)
    if rows is not None:
        head_in = ws.get("head_in", (rows.size, C))
        np.take(lnf, rows, axis=0, out=head_in)
        logits = ws.get("logits", (rows.size, V))
        linear(model, logits, head_in, model._head_name(), rows.size, C, V)
        return logits
    logits = ws.get("logits", (B, T, V))
    linear(model, logits, lnf, model._head_name(), N, C, V)
    return logits


def backward(model: "Model", ids: np.ndarray, dlogits: np.ndarray, rows: Optional[np.ndarray] = None) -> None:
    """Gradients from dlogits: (N, V), or (len(rows), V) for the forward that computed only rows."""
    cfg, p, ws = model.config, model.p, model._ws
    lora = model.lora
    frozen = lora is not None   # adapters train; the base weights get no gradients

    from pyllm.model import _FrozenGrads

    g = _FrozenGrads() if frozen else model.g
    B, T = ids.shape
    C, NH, NKV, HS, F, V = cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.head_size, cfg.intermediate_size, cfg.vocab_size
    N, QKV = B * T, (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_size
    cos, sin = (np.ascontiguousarray(t[:T]) for t in _rope_cache(model, T))
    dln = ws.get("dln", (N, C))
    if rows is None:
        linear_backward(model, dln, None if frozen else model._head_grad(), dlogits, ws.get("lnf", (N, C)),
                        model._head_name(), N, C, V)
    else:
        dhead = ws.get("dhead_in", (rows.size, C))
        linear_backward(model, dhead, None if frozen else model._head_grad(), dlogits,
                        ws.get("head_in", (rows.size, C)), model._head_name(), rows.size, C, V)
        dln.fill(0.0)
        dln[rows] = dhead
    dx = ws.get("dx", (N, C))
    _C.rmsnorm_backward(dx, g["model.norm.weight"], dln, ws.get(f"x{cfg.n_layer}", (N, C)), p["model.norm.weight"],
                        ws.get("lnfr", (N,)), N, C)
    dtmp = ws.get("dtmp", (N, C))
    for i in reversed(range(cfg.n_layer)):
        h = f"model.layers.{i}."
        # x_{i+1} = x_mid + swiglu(ln2 Wg^T, ln2 Wu^T) Wd^T
        dact = ws.get("dact", (N, F))
        linear_backward(model, dact, g[h + "mlp.down_proj.weight"], dx, ws.get(f"act.{i}", (N, F)),
                        h + "mlp.down_proj.weight", N, F, C)
        if lora is not None:
            lora.backward(dact, dx, ws.get(f"act.{i}", (N, F)), h + "mlp.down_proj.weight")
        dgate, dup = ws.get("dgate", (N, F)), ws.get("dup", (N, F))
        _C.swiglu_backward(dgate, dup, dact, ws.get(f"gate.{i}", (N, F)), ws.get(f"up.{i}", (N, F)))
        ln2 = ws.get(f"ln2.{i}", (N, C))
        linear_backward(model, dln, g[h + "mlp.gate_proj.weight"], dgate, ln2, h + "mlp.gate_proj.weight", N, C, F)
        linear_backward(model, dtmp, g[h + "mlp.up_proj.weight"], dup, ln2, h + "mlp.up_proj.weight", N, C, F)
        if lora is not None:
            lora.backward(dln, dgate, ln2, h + "mlp.gate_proj.weight")
            lora.backward(dtmp, dup, ln2, h + "mlp.up_proj.weight")
        dln += dtmp
        _C.rmsnorm_backward(dtmp, g[h + "post_attention_layernorm.weight"], dln, ws.get(f"xmid.{i}", (N, C)),
                            p[h + "post_attention_layernorm.weight"], ws.get(f"ln2r.{i}", (N,)), N, C)
        dx += dtmp     # d x_mid
        # x_mid = x_i + attention(rope(q), rope(k), v) Wo^T
        datty = ws.get("datty", (N, NH * HS))
        linear_backward(model, datty, g[h + "self_attn.o_proj.weight"], dx, ws.get(f"atty.{i}", (N, NH * HS)),
                        h + "self_attn.o_proj.weight", N, NH * HS, C)
        if lora is not None:
            lora.backward(datty, dx, ws.get(f"atty.{i}", (N, NH * HS)), h + "self_attn.o_proj.weight")
        datt = ws.get("datt", (B, NH, T, HS))
        np.copyto(datt, datty.reshape(B, T, NH, HS).transpose(0, 2, 1, 3))
        dq, dk, dv = ws.get("dq", (B, NH, T, HS)), ws.get("dk", (B, NKV, T, HS)), ws.get("dv", (B, NKV, T, HS))
        _C.attention_backward(dq, dk, dv, datt, ws.get(f"q.{i}", (B, NH, T, HS)), ws.get(f"k.{i}", (B, NKV, T, HS)),
                              ws.get(f"v.{i}", (B, NKV, T, HS)), ws.get(f"att.{i}", (B, NH, T, HS)),
                              ws.get(f"attlse.{i}", (B, NH, T)), B, NH, NKV, T, T, HS, True)
        dq0, dk0 = ws.get("dq0", (B, NH, T, HS)), ws.get("dk0", (B, NKV, T, HS))
        _C.rope_backward(dq0, dq, cos, sin, B * NH, T, HS)
        _C.rope_backward(dk0, dk, cos, sin, B * NKV, T, HS)
        dqkv = ws.get("dqkv", (N, QKV))
        rows = dqkv.reshape(B, T, NH + 2 * NKV, HS)
        np.copyto(rows[:, :, :NH], dq0.transpose(0, 2, 1, 3))
        np.copyto(rows[:, :, NH:NH + NKV], dk0.transpose(0, 2, 1, 3))
        np.copyto(rows[:, :, NH + NKV:], dv.transpose(0, 2, 1, 3))
        linear_backward(model, dln, None if frozen else _qkv_grad(model, i), dqkv, ws.get(f"ln1.{i}", (N, C)),
                        h + "self_attn.qkv", N, C, QKV)
        if lora is not None:
            nq, nkv = NH * HS, NKV * HS
            for name, cols in (("q", slice(0, nq)), ("k", slice(nq, nq + nkv)), ("v", slice(nq + nkv, QKV))):
                lora.backward(dln, dqkv[:, cols], ws.get(f"ln1.{i}", (N, C)), h + f"self_attn.{name}_proj.weight")
        _C.rmsnorm_backward(dtmp, g[h + "input_layernorm.weight"], dln, ws.get(f"x{i}", (N, C)),
                            p[h + "input_layernorm.weight"], ws.get(f"ln1r.{i}", (N,)), N, C)
        dx += dtmp     # d x_i
    if not frozen:
        _C.embedding_backward(model.g["model.embed_tokens.weight"], dx, ids, N, V, C)


def forward_step(model: "Model", ids: np.ndarray, cache: "KVCache", rows: slice) -> np.ndarray:
    """Model.forward_step for Llama: rotary angles at each row's own positions."""
    cfg, p = model.config, model.p
    lengths = cache.lengths[rows]
    B, Tq = ids.shape
    C, NH, NKV, HS, F, V = cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.head_size, cfg.intermediate_size, cfg.vocab_size
    N, eps, QKV = B * Tq, cfg.norm_eps, (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_size
    cos_all, sin_all = _rope_cache(model, int(lengths.max()) + Tq)
    positions = lengths[:, None] + np.arange(Tq)[None, :]
    new_lengths = np.ascontiguousarray(lengths + Tq, np.int64)
    Tk = int(new_lengths.max())
    x = np.empty((N, C), np.float32)
    embed(model, x, np.ascontiguousarray(ids, np.int64))
    ln, rstd = np.empty((N, C), np.float32), np.empty(N, np.float32)
    qkv, proj = np.empty((N, QKV), np.float32), np.empty((N, C), np.float32)
    q0, q = np.empty((B, NH, Tq, HS), np.float32), np.empty((B, NH, Tq, HS), np.float32)
    k0, k, v = (np.empty((B, NKV, Tq, HS), np.float32) for _ in range(3))
    att, lse = np.empty((B, NH, Tq, HS), np.float32), np.empty((B, NH, Tq), np.float32)
    atty = np.empty((N, NH * HS), np.float32)
    gate, up = np.empty((N, F), np.float32), np.empty((N, F), np.float32)
    same_length = bool((lengths == lengths[0]).all())   # the usual case: one row, or a batch in step
    start = int(lengths[0])
    tables = [(np.ascontiguousarray(cos_all[n:n + Tq]), np.ascontiguousarray(sin_all[n:n + Tq]))
              for n in (lengths[:1] if same_length else lengths)]
    batch_index = np.arange(B)[:, None]
    for i in range(cfg.n_layer):
        h = f"model.layers.{i}."
        _C.rmsnorm_forward(ln, rstd, x, p[h + "input_layernorm.weight"], N, C, eps)
        linear(model, qkv, ln, f"model.layers.{i}.self_attn.qkv", N, C, QKV)
        if model.lora is not None:
            nq, nkv = NH * HS, NKV * HS
            for name, cols in (("q", slice(0, nq)), ("k", slice(nq, nq + nkv)), ("v", slice(nq + nkv, QKV))):
                model.lora.forward(qkv, ln, h + f"self_attn.{name}_proj.weight", cols)
        k_cache, v_cache = cache.k[i][rows], cache.v[i][rows]
        if B == 1 and Tq == 1:   # decoding one sequence: qkv's rows are already the heads, no copies
            heads = qkv.reshape(NH + 2 * NKV, HS)
            cos, sin = tables[0]
            _C.rope_forward(q, heads[:NH], cos, sin, NH, 1, HS)
            _C.rope_forward(k, heads[NH:NH + NKV], cos, sin, NKV, 1, HS)
            k_cache[0, :, start] = k[0, :, 0]
            v_cache[0, :, start] = heads[NH + NKV:]
        elif same_length:
            _split_heads(qkv, B, Tq, cfg, q0, k0, v)
            cos, sin = tables[0]
            _C.rope_forward(q, q0, cos, sin, B * NH, Tq, HS)
            _C.rope_forward(k, k0, cos, sin, B * NKV, Tq, HS)
            k_cache[:, :, start:start + Tq] = k
            v_cache[:, :, start:start + Tq] = v
        else:
            _split_heads(qkv, B, Tq, cfg, q0, k0, v)
            for b, (cos, sin) in enumerate(tables):
                _C.rope_forward(q[b], q0[b], cos, sin, NH, Tq, HS)
                _C.rope_forward(k[b], k0[b], cos, sin, NKV, Tq, HS)
            k_cache[batch_index, :, positions] = k.transpose(0, 2, 1, 3)
            v_cache[batch_index, :, positions] = v.transpose(0, 2, 1, 3)
        _C.attention_forward(att, lse, q, k_cache, v_cache, B, NH, NKV, Tq, Tk, HS, True, cache.capacity,
                             new_lengths)
        if Tq == 1:
            atty = att.reshape(B, NH * HS)    # (B, NH, 1, HS) is already (B, NH HS)
        else:
            np.copyto(atty.reshape(B, Tq, NH, HS), att.transpose(0, 2, 1, 3))
        linear(model, proj, atty, h + "self_attn.o_proj.weight", N, NH * HS, C)
        if model.lora is not None:
            model.lora.forward(proj, atty, h + "self_attn.o_proj.weight")
        x += proj
        _C.rmsnorm_forward(ln, rstd, x, p[h + "post_attention_layernorm.weight"], N, C, eps)
        linear(model, gate, ln, h + "mlp.gate_proj.weight", N, C, F)
        linear(model, up, ln, h + "mlp.up_proj.weight", N, C, F)
        if model.lora is not None:
            model.lora.forward(gate, ln, h + "mlp.gate_proj.weight")
            model.lora.forward(up, ln, h + "mlp.up_proj.weight")
        _C.swiglu_forward(gate, gate, up)
        linear(model, proj, gate, h + "mlp.down_proj.weight", N, F, C)
        if model.lora is not None:
            model.lora.forward(proj, gate, h + "mlp.down_proj.weight")
        x += proj
    last = np.ascontiguousarray(x.reshape(B, Tq, C)[:, -1])
    lnf = np.empty((B, C), np.float32)
    _C.rmsnorm_forward(lnf, rstd[:B], last, p["model.norm.weight"], B, C, eps)
    logits = np.empty((B, V), np.float32)
    linear(model, logits, lnf, model._head_name(), B, C, V)
    cache.lengths[rows] = new_lengths
    return logits
