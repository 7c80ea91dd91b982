"""The pre-norm decoder block both architectures share, written once: the training forward (saving
what backward needs) and its backward. The cached decode step runs the same block in C++
(csrc/model/step.cpp, planned by decode.py), with the same kernels in the same order.

    x_mid = x + attention(norm1(x)) W_o        x_next = x_mid + mlp(norm2(x_mid))
    (Gemma: x_mid = x + post1(attention(...) W_o), x_next = x_mid + post2(mlp(norm2(x_mid))))

q, k and v come from one fused product; attention and rope read them as strided views of its output
(no head is copied). What differs between architectures (norm kind, positions, the feed-forward,
names) is an `Architecture` (gpt2.py, llama.py). Not parameter storage or input checks
(transformer.py).
Shape legend: B batch, T time, C channels, NH query heads, NKV key/value heads, HS head size,
N = B*T rows, V vocabulary.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from pyllm.kernels import unchecked as fast
from pyllm.models.config import ModelConfig
from pyllm.models.layers import Layer, Norm, Projection, Weights, linear, linear_backward
from pyllm.models.workspace import Workspace


class Architecture:
    """What an architecture adds to the shared block: its parameters, norm, positions and MLP."""

    name: str
    norm: str               # "layernorm" or "rmsnorm"
    rotary: bool            # rope on q and k (else positions are added to the embedding)
    embedding: str          # the token embedding's parameter name
    positions: Optional[str] = None   # a learned position table added to it (GPT-2), if any
    final_norm: tuple       # (weight, bias or None)
    step: str = "llama"     # the C++ step's block kind: "gpt2" or "llama" (rotary, a gated MLP)
    activation: str = "swiglu"   # the llama block's gate: silu(gate) * up, or "geglu" (Gemma)

    def embed_scale(self, n_embd: int) -> float:
        """What the token embedding's rows are multiplied by (Gemma: sqrt(n_embd))."""
        return 1.0

    def norm_offsets(self, cfg: ModelConfig) -> dict:
        """Parameter name -> what Hugging Face's files store less than pyllm keeps (Gemma's norms)."""
        return {}

    def parameter_specs(self, cfg: ModelConfig) -> list:
        """Every parameter (ParamSpec) with its Hugging Face name, decayed ones first."""
        raise NotImplementedError

    def layers(self, cfg: ModelConfig) -> list[Layer]:
        raise NotImplementedError

    def embed(self, model: Weights, out: np.ndarray, ids: np.ndarray) -> None:
        """out (N, C) = the input of the first block for ids (B, T) at positions 0 .. T-1."""
        raise NotImplementedError

    def embed_backward(self, model: Weights, grads, dx: np.ndarray, ids: np.ndarray) -> None:
        """Accumulates the embeddings' gradients from dx (N, C) for ids (B, T) at positions 0 .. T-1."""
        raise NotImplementedError

    def mlp_forward(self, model: Weights, layer: Layer, ws: Workspace, tag: str, x: np.ndarray,
                    out: np.ndarray) -> None:
        """out (N, C) = mlp(x), keeping what backward needs in ws under `tag` (the layer)."""
        raise NotImplementedError

    def mlp_backward(self, model: Weights, layer: Layer, ws: Workspace, tag: str, dx: np.ndarray,
                     dout: np.ndarray, x: np.ndarray) -> None:
        """dx (N, C) = d mlp(x) (overwritten), the projections' gradients accumulated."""
        raise NotImplementedError


def head_projection(cfg: ModelConfig, arch: Architecture) -> Projection:
    """The output head: logits = x E^T with E the token embedding (tied) or lm_head, both (V, C)."""
    name = arch.embedding if cfg.tie_word_embeddings else "lm_head.weight"
    return Projection(name, cfg.n_embd, cfg.vocab_size)


def _head_views(qkv: np.ndarray, B: int, T: int, cfg: ModelConfig) -> tuple:
    """q (B, T, NH, HS), k and v (B, T, NKV, HS): views of the fused projection's columns."""
    NH, NKV = cfg.n_head, cfg.n_kv_head
    heads = qkv.reshape(B, T, NH + 2 * NKV, cfg.head_size)
    return heads[:, :, :NH], heads[:, :, NH:NH + NKV], heads[:, :, NH + NKV:]


def _by_head(x: np.ndarray) -> np.ndarray:
    """(B, T, H, HS) -> the same memory as (B, H, T, HS), what attention takes."""
    return x.transpose(0, 2, 1, 3)


class Runner:
    """The shared block run over a model's weights for training: forward and backward."""

    def __init__(self, cfg: ModelConfig, arch: Architecture) -> None:
        self.cfg, self.arch = cfg, arch
        self.norm = Norm(arch.norm, cfg.norm_eps)
        self.layers = arch.layers(cfg)
        self.head = head_projection(cfg, arch)
        self.qkv_width = (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_size
        self.query_scale = np.float32(cfg.query_scale)
        self.softcap = cfg.final_logit_softcapping

    # ------------------------------------------------------------------ Qwen3's head norms

    def _head_norms(self, model: Weights, ws: Workspace, i: int, layer: Layer, q: np.ndarray, k: np.ndarray) -> None:
        """q and k (views of the fused product) replaced by their RMSNorm over each head's HS values;
        the inputs kept (contiguous, one row per head) for backward. The C++ step does the same."""
        for tag, heads, weight in (("q", q, layer.qk_norm[0]), ("k", k, layer.qk_norm[1])):
            B, T, H, HS = heads.shape
            raw = ws.get(f"{tag}raw.{i}", (B * T * H, HS))
            np.copyto(raw.reshape(heads.shape), heads)
            normed = ws.get("headnorm", raw.shape)
            fast.rmsnorm_forward(normed, ws.get(f"{tag}rstd.{i}", (raw.shape[0],)), raw, model.p[weight],
                                 raw.shape[0], HS, self.cfg.norm_eps)
            np.copyto(heads, normed.reshape(heads.shape))

    def _head_norms_backward(self, model: Weights, grads, ws: Workspace, i: int, layer: Layer, dq: np.ndarray,
                             dk: np.ndarray) -> None:
        """dq and dk (views of the fused gradient) taken back through the head norms."""
        for tag, dheads, weight in (("q", dq, layer.qk_norm[0]), ("k", dk, layer.qk_norm[1])):
            B, T, H, HS = dheads.shape
            rows = B * T * H
            dnormed = ws.get("dheadnorm", (rows, HS))
            np.copyto(dnormed.reshape(dheads.shape), dheads)
            draw = ws.get("dheadraw", (rows, HS))
            fast.rmsnorm_backward(draw, grads[weight] if grads is not None else None, dnormed,
                                  ws.get(f"{tag}raw.{i}", (rows, HS)), model.p[weight],
                                  ws.get(f"{tag}rstd.{i}", (rows,)), rows, HS)
            np.copyto(dheads, draw.reshape(dheads.shape))

    # ------------------------------------------------------------------ training

    def forward(self, model: Weights, ws: Workspace, ids: np.ndarray, ropes: Optional[tuple],
                rows: Optional[np.ndarray] = None, head: bool = True,
                attention_maps: Optional[list] = None) -> np.ndarray:
        """Logits (B, T, V), or with rows (flat positions b * T + t) only theirs, (len(rows), V),
        keeping every activation backward needs in ws. ropes: the (cos, sin) tables from position 0
        of the global and the local layers (the same pair unless the config sets a local base).
        head=False: the last hidden states instead (after the final norm), (B, T, C).
        attention_maps, a list: each layer's attention weights (B, NH, T, T) appended to it."""
        cfg, arch, norm = self.cfg, self.arch, self.norm
        B, T = ids.shape
        N, C, NH, HS = B * T, cfg.n_embd, cfg.n_head, cfg.head_size
        ws.reset((B, T))
        x = ws.get("x0", (N, C))
        arch.embed(model, x, ids)
        for i, layer in enumerate(self.layers):
            ln1 = ws.get(f"ln1.{i}", (N, C))
            norm.forward(model, ws, f"ln1.{i}", ln1, x, layer.norm1)
            qkv = ws.get(f"qkv.{i}", (N, self.qkv_width))
            linear(model, layer.qkv, qkv, ln1)
            q, k, v = _head_views(qkv, B, T, cfg)
            if layer.qk_norm is not None:
                self._head_norms(model, ws, i, layer, q, k)
            if ropes is not None:   # in place: the saved qkv holds the rotated q and k backward needs
                cos, sin = ropes[layer.local_rope]
                fast.rope_forward(q, q, cos, sin, None)
                fast.rope_forward(k, k, cos, sin, None)
            if self.query_scale != 1:
                q *= self.query_scale
            atty = ws.get(f"atty.{i}", (N, NH * HS))
            fast.attention_forward(_by_head(atty.reshape(B, T, NH, HS)), ws.get(f"attlse.{i}", (B, NH, T)),
                                   _by_head(q), _by_head(k), _by_head(v), True, None, window=layer.window)
            if attention_maps is not None:
                probs = np.empty((B, NH, T, T), np.float32)
                fast.attention_probabilities(probs, _by_head(q), _by_head(k), ws.get(f"attlse.{i}", (B, NH, T)), True,
                                             window=layer.window)
                attention_maps.append(probs)
            post = layer.post_norms
            proj = ws.get(f"attout.{i}" if post else "proj", (N, C))
            linear(model, layer.o, proj, atty)
            x_mid = ws.get(f"xmid.{i}", (N, C))
            np.add(x, self._post_norm(model, ws, f"pn1.{i}", proj, post, 0), out=x_mid)
            ln2 = ws.get(f"ln2.{i}", (N, C))
            norm.forward(model, ws, f"ln2.{i}", ln2, x_mid, layer.norm2)
            mlp_out = ws.get(f"mlpout.{i}" if post else "proj", (N, C))
            arch.mlp_forward(model, layer, ws, str(i), ln2, mlp_out)
            x = ws.get(f"x{i + 1}", (N, C))
            np.add(x_mid, self._post_norm(model, ws, f"pn2.{i}", mlp_out, post, 1), out=x)
        lnf = ws.get("lnf", (N, C))
        norm.forward(model, ws, "lnf", lnf, x, arch.final_norm)
        if not head:
            return lnf.reshape(B, T, C)
        if rows is not None:   # training needs no logits where the target is ignored (a prompt)
            head_in = ws.get("head_in", (rows.size, C))
            np.take(lnf, rows, axis=0, out=head_in)
            logits = ws.get("logits", (rows.size, cfg.vocab_size))
            linear(model, self.head, logits, head_in)
            return self._soft_cap(ws, logits)
        logits = ws.get("logits", (B, T, cfg.vocab_size))
        linear(model, self.head, logits.reshape(N, cfg.vocab_size), lnf)
        return self._soft_cap(ws, logits)

    def head_logits(self, model: Weights, ws: Workspace, x: np.ndarray) -> np.ndarray:
        """Logits (N, V) of residual-stream rows x (N, C) taken through the final norm and the head,
        as if the layers after them were skipped (the logit lens); after forward, x the last layer's
        output gives forward's logits. Uses its own buffers: forward's saved values stay."""
        N, C = x.shape
        normed = ws.get("lens_norm", (N, C))
        self.norm.forward(model, ws, "lens", normed, np.ascontiguousarray(x, np.float32), self.arch.final_norm)
        logits = ws.get("lens_logits", (N, self.cfg.vocab_size))
        linear(model, self.head, logits, normed)
        if self.softcap is not None:
            np.tanh(logits / np.float32(self.softcap), out=logits)
            logits *= np.float32(self.softcap)
        return logits

    def _post_norm(self, model: Weights, ws: Workspace, tag: str, x: np.ndarray, post: Optional[tuple],
                   which: int) -> np.ndarray:
        """x through the layer's norm after a sub-block (Gemma), or x itself without one."""
        if post is None:
            return x
        out = ws.get("postnorm", x.shape)
        self.norm.forward(model, ws, tag, out, x, (post[which], None))
        return out

    def _post_norm_backward(self, model: Weights, grads, ws: Workspace, tag: str, dout: np.ndarray,
                            x: Optional[np.ndarray], post: Optional[tuple], which: int) -> np.ndarray:
        """d of the sub-block's output from dout, through the norm after it (Gemma), or dout itself."""
        if post is None:
            return dout
        dx = ws.get("dpostnorm", dout.shape)
        self.norm.backward(model, grads, ws, tag, dx, dout, x, (post[which], None))
        return dx

    def _soft_cap(self, ws: Workspace, logits: np.ndarray) -> np.ndarray:
        """logits = c tanh(logits / c) in place when the config caps them (tanh kept for backward)."""
        if self.softcap is None:
            return logits
        V = logits.shape[-1]
        flat = logits.reshape(-1, V)
        capped = ws.get("softcap", flat.shape)
        np.divide(flat, np.float32(self.softcap), out=capped)
        np.tanh(capped, out=capped)
        np.multiply(capped, np.float32(self.softcap), out=flat)
        return logits

    def backward(self, model: Weights, grads, ws: Workspace, ids: np.ndarray, dlogits: np.ndarray,
                 ropes: Optional[tuple], rows: Optional[np.ndarray] = None,
                 layer_done: Optional[Callable[[int], None]] = None) -> None:
        """Gradients from dlogits (N, V), or (len(rows), V) after forward(ids, rows), back through the
        activations the last forward kept (dlogits overwritten); grads None: frozen (adapters only).
        layer_done(i), if given, is called once layer i's gradients are complete (last layer first):
        data-parallel training starts summing them across processes while backward goes on."""
        cfg, arch, norm = self.cfg, self.arch, self.norm
        B, T = ids.shape
        N, C, NH, HS = B * T, cfg.n_embd, cfg.n_head, cfg.head_size
        if self.softcap is not None:   # d c tanh(z / c) / dz = 1 - tanh^2
            capped = ws.get("softcap", (dlogits.size // cfg.vocab_size, cfg.vocab_size))
            dlogits.reshape(capped.shape)[...] *= 1 - capped * capped
        dln = ws.get("dln", (N, C))
        if rows is None:
            linear_backward(model, self.head, dln, dlogits, ws.get("lnf", (N, C)))
        else:
            dhead = ws.get("dhead_in", (rows.size, C))
            linear_backward(model, self.head, dhead, dlogits, ws.get("head_in", (rows.size, C)))
            dln.fill(0.0)
            dln[rows] = dhead
        dx = ws.get("dx", (N, C))
        norm.backward(model, grads, ws, "lnf", dx, dln, ws.get(f"x{cfg.n_layer}", (N, C)), arch.final_norm)
        dtmp = ws.get("dtmp", (N, C))
        for i in reversed(range(cfg.n_layer)):
            layer = self.layers[i]
            # x_next = x_mid + post2(mlp(norm2(x_mid)))
            post = layer.post_norms
            dmlp = self._post_norm_backward(model, grads, ws, f"pn2.{i}", dx, ws.get(f"mlpout.{i}", (N, C)) if post
                                            else None, post, 1)
            arch.mlp_backward(model, layer, ws, str(i), dln, dmlp, ws.get(f"ln2.{i}", (N, C)))
            norm.backward(model, grads, ws, f"ln2.{i}", dtmp, dln, ws.get(f"xmid.{i}", (N, C)), layer.norm2)
            dx += dtmp     # now d x_mid
            # x_mid = x + post1(attention(q, k, v of norm1(x)) W_o)
            atty = ws.get(f"atty.{i}", (N, NH * HS))
            datty = ws.get("datty", (N, NH * HS))
            dproj = self._post_norm_backward(model, grads, ws, f"pn1.{i}", dx, ws.get(f"attout.{i}", (N, C)) if post
                                             else None, post, 0)
            linear_backward(model, layer.o, datty, dproj, atty)
            q, k, v = _head_views(ws.get(f"qkv.{i}", (N, self.qkv_width)), B, T, cfg)
            dqkv = ws.get("dqkv", (N, self.qkv_width))
            dq, dk, dv = _head_views(dqkv, B, T, cfg)
            fast.attention_backward(_by_head(dq), _by_head(dk), _by_head(dv), _by_head(datty.reshape(B, T, NH, HS)),
                                    _by_head(q), _by_head(k), _by_head(v), _by_head(atty.reshape(B, T, NH, HS)),
                                    ws.get(f"attlse.{i}", (B, NH, T)), True, window=layer.window)
            if self.query_scale != 1:
                dq *= self.query_scale
            if ropes is not None:
                cos, sin = ropes[layer.local_rope]
                fast.rope_backward(dq, dq, cos, sin, None)
                fast.rope_backward(dk, dk, cos, sin, None)
            if layer.qk_norm is not None:
                self._head_norms_backward(model, grads, ws, i, layer, dq, dk)
            linear_backward(model, layer.qkv, dln, dqkv, ws.get(f"ln1.{i}", (N, C)))
            norm.backward(model, grads, ws, f"ln1.{i}", dtmp, dln, ws.get(f"x{i}", (N, C)), layer.norm1)
            dx += dtmp     # now d x
            if layer_done is not None:
                layer_done(i)
        if grads is not None:
            arch.embed_backward(model, grads, dx, ids)
