"""The Llama-shaped families beyond Llama (Qwen2: q/k/v biases; Qwen3: RMS norms on each q and k
head, head_dim apart from n_embd / n_head; Mistral: a sliding window; Gemma 3: GeGLU, norms after
each sub-block, local and global layers, query scalar, soft-capped logits) against transformers on
random weights: logits, loss and every gradient; cached decode against recomputation; LoRA on them;
their folders both ways."""

import json

import numpy as np
import pytest

from conftest import add_gguf_vocabulary, hf_twin
from pyllm.model import Model, ModelConfig

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

BASE = dict(vocab_size=91, block_size=40, n_layer=2, n_head=4, n_embd=48, intermediate_size=80, rope_theta=1e6)


def config_of(arch, extra):
    return ModelConfig(arch=arch, **{**BASE, **extra})
FAMILIES = {
    "qwen2": [dict(n_kv_head=2), dict(n_kv_head=1, tie_word_embeddings=False)],
    "qwen3": [dict(n_kv_head=2, head_dim=16), dict(n_kv_head=4, tie_word_embeddings=False),
              dict(n_kv_head=1, head_dim=8)],
    "llama": [dict(n_kv_head=2, sliding_window=4), dict(n_kv_head=1, sliding_window=9, head_dim=16,
                                                        tie_word_embeddings=False)],   # Mistral's
    "gemma3": [dict(n_kv_head=1, head_dim=16, sliding_window=4, layer_types=["sliding_attention", "full_attention"],
                    rope_local_theta=1e4, query_pre_attn_scalar=20.0, final_logit_softcapping=5.0),
               dict(n_kv_head=2, sliding_window=3, tie_word_embeddings=False,
                    rope_scaling={"rope_type": "linear", "factor": 2.0}),
               dict(n_kv_head=4, head_dim=8, n_layer=3, sliding_window=5, rope_local_theta=1e4,
                    layer_types=["full_attention", "sliding_attention", "sliding_attention"])],
}
CASES = [(arch, extra) for arch, extras in FAMILIES.items() for extra in extras]


def assert_close(ours, theirs, rtol=1e-4, what=""):
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    err = np.abs(ours - theirs).max() / max(np.abs(theirs).max(), 1e-6)
    assert err <= rtol, f"{what}: max error {err:.2e} of the largest magnitude (limit {rtol})"


def random_model(arch, extra, seed=0) -> Model:
    model = Model(config_of(arch, extra), seed=seed)
    rng = np.random.default_rng(seed + 1)
    for spec in model.specs:   # norms away from 1 and biases away from 0, so their use is checked
        if not spec.decay and "embed" not in spec.name:
            model.p[spec.name][...] += rng.standard_normal(spec.shape).astype(np.float32) * 0.3
    return model


@pytest.mark.parametrize("arch, extra", CASES, ids=[f"{a}-{i}" for a, e in FAMILIES.items() for i in range(len(e))])
def test_logits_loss_and_every_gradient_equal_transformers(arch, extra):
    model = random_model(arch, extra)
    theirs = hf_twin(model)
    rng = np.random.default_rng(2)
    ids = rng.integers(0, model.config.vocab_size, (2, 13))
    targets = rng.integers(0, model.config.vocab_size, (2, 13))
    targets[:, :3] = -100
    t_logits = theirs(torch.from_numpy(ids)).logits
    assert_close(model(ids), t_logits.detach().numpy(), what="logits")
    t_loss = torch.nn.functional.cross_entropy(t_logits.reshape(-1, model.config.vocab_size),
                                               torch.from_numpy(targets).reshape(-1), ignore_index=-100)
    t_loss.backward()
    loss = model.forward_backward(ids, targets)
    assert loss == pytest.approx(t_loss.item(), rel=1e-5)
    t_params = dict(theirs.named_parameters())
    grads = model.named_grads()
    assert set(grads) == set(t_params) - ({"lm_head.weight"} if model.config.tie_word_embeddings else set())
    for name, grad in grads.items():
        assert_close(grad, t_params[name].grad.numpy(), what=name)


@pytest.mark.parametrize("arch, extra", CASES[::2] + [CASES[7], CASES[9]])
def test_cached_decode_equals_recomputation(arch, extra):
    from pyllm.generate import generate

    model = random_model(arch, extra, seed=3)
    prompts = [[1, 2, 3, 4, 5, 6], [7], [8, 9, 10]]
    cached = model.generate(prompts, 9, temperature=0)
    again = generate(model, prompts, 9, temperature=0, use_cache=False)
    assert [c.tolist() for c in cached] == [c.tolist() for c in again]
    # A step's logits are the full forward pass's at that position.
    from pyllm.models import KVCache

    ids = np.arange(1, 15)[None, :] % model.config.vocab_size
    full = model(ids)[0]
    cache = KVCache(model.config, 1, 20)
    model.forward_step(ids[:, :9], cache)
    for t in range(9, 14):
        assert_close(model.forward_step(ids[:, t:t + 1], cache)[0], full[t], rtol=1e-5, what=f"step {t}")


@pytest.mark.parametrize("arch, extra", [CASES[0], CASES[2], CASES[5], CASES[7], CASES[8]],
                         ids=["qwen2", "qwen3", "mistral", "gemma3", "gemma3-scaled"])
def test_folders_round_trip_through_transformers(arch, extra, tmp_path):
    model = random_model(arch, extra, seed=5)
    model.save_pretrained(tmp_path)
    theirs = getattr(transformers, json.loads((tmp_path / "config.json").read_text())["architectures"][0]
                     ).from_pretrained(tmp_path)
    theirs.eval()
    ids = np.arange(3, 20)[None, :]
    with torch.no_grad():
        assert_close(model(ids), theirs(torch.from_numpy(ids)).logits.numpy(), what="transformers reads ours")
    # transformers' own writing, sharded and in bfloat16: read as its bf16 values widened.
    theirs.to(torch.bfloat16).save_pretrained(tmp_path / "back", max_shard_size="20KB")
    assert json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())["weight_map"]
    again = Model.from_pretrained(tmp_path / "back")
    assert again.config == model.config
    # Read back into float32 by transformers too (theirs.float() would keep Gemma's embedding scale
    # rounded to bfloat16, a buffer no file holds).
    widened = type(theirs).from_pretrained(tmp_path / "back", dtype=torch.float32)
    with torch.no_grad():
        expected = widened.eval()(torch.from_numpy(ids)).logits.numpy()
    assert_close(again(ids), expected, rtol=1e-4, what="our reading of a sharded bf16 folder")


def test_the_sliding_window_is_what_mistral_s_attention_sees():
    """A window shorter than the sequence changes the logits after it (and only there), the
    folder says MistralForCausalLM, and a GGUF's sliding_window key gives the same config."""
    windowed = random_model("llama", dict(n_kv_head=2, sliding_window=4))
    full = Model(ModelConfig(**{**windowed.config.to_dict(), "sliding_window": None}), seed=None)
    full.load_state_dict(windowed.state_dict())
    ids = np.arange(1, 12)[None, :]
    a, b = windowed(ids), full(ids)
    assert np.array_equal(a[0, :4], b[0, :4]) and np.abs(a[0, 4:] - b[0, 4:]).max() > 1e-3
    from pyllm.io.hf import config_from_hf, config_to_hf
    doc = config_to_hf(windowed.config)
    assert doc["model_type"] == "mistral" and doc["sliding_window"] == 4
    assert config_from_hf(doc) == windowed.config
    import tempfile
    from pyllm.io.gguf import GGUFFile
    from pyllm.io.gguf_model import config_from_gguf
    with tempfile.TemporaryDirectory() as tmp:
        windowed.save_gguf(f"{tmp}/w.gguf", "f32", progress=False)
        f = GGUFFile(f"{tmp}/w.gguf")
        assert config_from_gguf(f).sliding_window == 4
        f.close()


@pytest.mark.parametrize("arch", ["qwen3", "gemma3"])
def test_lora_adapters_train_on_the_families(arch):
    from pyllm.lora import LoRA, LoRAConfig

    model = random_model(arch, FAMILIES[arch][0])
    base = model(np.arange(5)[None, :])
    lora = model.lora = LoRA(model, LoRAConfig(rank=4, alpha=8, targets=("q_proj", "v_proj", "down_proj")))
    assert_close(model(np.arange(5)[None, :]), base, rtol=1e-6, what="fresh adapters change nothing")
    ids = np.arange(10)[None, :]
    loss = model.forward_backward(ids, np.roll(ids, -1))
    assert np.isfinite(loss) and any(np.abs(g).sum() > 0 for g in lora.gB.values())


def test_bad_family_configs_are_refused():
    with pytest.raises(ValueError, match="head_dim"):
        ModelConfig(arch="qwen3", **BASE, head_dim=0)
    with pytest.raises(ValueError, match="multiple of n_head"):
        ModelConfig(arch="qwen2", **{**BASE, "n_embd": 50})
    from pyllm.io.hf import config_from_hf, config_to_hf

    doc = config_to_hf(ModelConfig(arch="qwen2", **BASE))
    with pytest.raises(ValueError, match="sliding"):
        config_from_hf({**doc, "use_sliding_window": True})
    with pytest.raises(ValueError, match="not supported"):
        config_from_hf({**doc, "model_type": "falcon"})
    with pytest.raises(ValueError, match="multimodal"):
        config_from_hf({**doc, "model_type": "gemma3"})
    gemma = config_to_hf(config_of("gemma3", FAMILIES["gemma3"][0]))
    for key, value in (("attn_logit_softcapping", 50.0), ("use_bidirectional_attention", True),
                       ("hidden_activation", "relu")):
        with pytest.raises(ValueError, match=key.split("_")[0]):
            config_from_hf({**gemma, key: value})
    with pytest.raises(ValueError, match="layer_types"):
        config_of("gemma3", dict(sliding_window=4, layer_types=["sliding_attention"]))
    with pytest.raises(ValueError, match="rope_local_theta"):
        config_of("llama", dict(rope_local_theta=1e4))


# ----------------------------------------------------------------------------- GGUF files

GGUF_LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
              "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate",
              "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
TEXT = "the quick brown fox jumps over the lazy dog. " * 40 + "pack my box with five dozen liquor jugs. " * 40


def write_qwen_gguf(path, model: Model, tokenizer, matrix_type, extra=None) -> None:
    """A GGUF file as llama.cpp's converter writes a Llama-shaped model: its metadata, llama.cpp's
    tensor names, matrices (out, in) in matrix_type, q/k rows as they are (qwen: rotate-half rope)
    or permuted for llama.cpp's interleaved rope (llama); `extra`: more tensors by GGUF name."""
    gguf = pytest.importorskip("gguf")
    from gguf.quants import quantize

    cfg = model.config
    w = gguf.GGUFWriter(str(path), cfg.arch)
    w.add_context_length(cfg.block_size)
    w.add_embedding_length(cfg.n_embd)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_block_count(cfg.n_layer)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_kv_head)
    w.add_key_length(cfg.head_size)
    w.add_value_length(cfg.head_size)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    add_gguf_vocabulary(w, tokenizer)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    for name, value in model.state_dict().items():
        if name in names:
            target = names[name]
        else:
            _, _, layer, rest = name.split(".", 3)
            module, part = rest.rsplit(".", 1)
            target = f"blk.{layer}.{GGUF_LAYER[module]}.{part}"
            if cfg.arch == "llama" and module in ("self_attn.q_proj", "self_attn.k_proj"):
                heads = cfg.n_head if module == "self_attn.q_proj" else cfg.n_kv_head
                value = value.reshape(heads, 2, value.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(value.shape)
        value = np.ascontiguousarray(value, np.float32)
        if value.ndim == 2 and matrix_type != gguf.GGMLQuantizationType.F32:
            w.add_tensor(target, quantize(value, matrix_type), raw_dtype=matrix_type)
        else:
            w.add_tensor(target, value)
    for target, value in (extra or {}).items():
        w.add_tensor(target, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tokenizer():
    from pyllm.tokenizer import Tokenizer

    return Tokenizer.train(TEXT, 300, pattern="gpt2", special_tokens=["<|endoftext|>"], progress=False)


@pytest.mark.parametrize("arch, extra", [CASES[0], CASES[1], CASES[2]], ids=["qwen2", "qwen2-untied", "qwen3"])
@pytest.mark.parametrize("kind", ["F32", "Q8_0"])
def test_gguf_files_load_with_the_model_s_logits_and_llama_cpp_agrees(arch, extra, kind, tokenizer, tmp_path):
    gguf = pytest.importorskip("gguf")
    from pyllm.llm import LLM

    sizes = {**BASE, "vocab_size": tokenizer.vocab_size, "n_embd": 64, "intermediate_size": 96}   # 32-value blocks
    model = Model(ModelConfig(arch=arch, **sizes, **extra), seed=7)
    rng = np.random.default_rng(8)
    for spec in model.specs:
        if not spec.decay and "embed" not in spec.name:
            model.p[spec.name][...] += rng.standard_normal(spec.shape).astype(np.float32) * 0.3
    path = tmp_path / f"{arch}.gguf"
    write_qwen_gguf(path, model, tokenizer, getattr(gguf.GGMLQuantizationType, kind))
    loaded = LLM.load(path)
    import dataclasses

    assert loaded.model.config.norm_eps == pytest.approx(model.config.norm_eps)   # stored as float32
    assert dataclasses.replace(loaded.model.config, norm_eps=model.config.norm_eps) == model.config
    assert bool(loaded.model.quantized) == (kind != "F32")
    ids = np.array([tokenizer.encode("the quick brown fox jumps")])
    expected = model(ids)
    assert_close(loaded.model(ids), expected, rtol=1e-5 if kind == "F32" else 0.03, what=f"{kind} file")
    llama_cpp = pytest.importorskip("llama_cpp")
    ref = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=2, verbose=False)
    ref.eval(ids[0].tolist())
    theirs = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ref._ctx.ctx, -1), shape=(ref.n_vocab(),))
    ours = loaded.model(ids)[0, -1]
    assert int(np.argmax(ours)) == int(np.argmax(theirs))
    assert_close(ours, theirs, rtol=0.03, what="llama.cpp on the same file")


# ----------------------------------------------------------------------------- Llama 3's scaled rope

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}


def test_llama3_rope_scaling_equals_transformers_and_survives_its_files(tmp_path):
    from pyllm.io.hf import config_to_hf

    cfg = ModelConfig(arch="llama", **{**BASE, "rope_theta": 10000.0, "block_size": 128}, n_kv_head=2, head_dim=16,
                      rope_scaling=LLAMA3_ROPE)
    factors = cfg.rope_freq_factors()   # wavelengths 2 pi 10000^(i/8): 6.3 (kept), 20 and 63 (blended), more
    assert factors[0] == 1.0 and (factors[3:] == 8.0).all() and 1 < factors[1] < factors[2] < 8
    model = Model(cfg, seed=9)
    theirs = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config_to_hf(cfg)))
    theirs.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in model.state_dict().items()}, strict=False)
    theirs.tie_weights()
    theirs.eval()
    ids = (np.arange(100)[None, :] * 7) % cfg.vocab_size   # past the original 64 positions
    with torch.no_grad():
        expected = theirs(torch.from_numpy(ids)).logits.numpy()
    assert_close(model(ids), expected, what="llama3 rope")
    plain = Model(ModelConfig(**{**cfg.to_dict(), "rope_scaling": None}), seed=9)
    assert np.abs(plain(ids) - expected).max() > 1e-3   # the scaling matters here
    model.save_pretrained(tmp_path)
    assert Model.from_pretrained(tmp_path).config == cfg


def test_a_gguf_rope_freqs_tensor_scales_the_rope_as_llama_cpp_does(tokenizer, tmp_path):
    gguf = pytest.importorskip("gguf")
    from pyllm.llm import LLM

    sizes = {**BASE, "vocab_size": tokenizer.vocab_size, "n_embd": 64, "intermediate_size": 96, "rope_theta": 10000.0,
             "block_size": 128}
    cfg = ModelConfig(arch="llama", **sizes, n_kv_head=2, rope_scaling=LLAMA3_ROPE)
    model = Model(cfg, seed=10)
    path = tmp_path / "scaled.gguf"
    write_qwen_gguf(path, model, tokenizer, gguf.GGMLQuantizationType.F32,
                    extra={"rope_freqs.weight": cfg.rope_freq_factors().astype(np.float32)})
    loaded = LLM.load(path)
    assert loaded.model.config.rope_scaling["rope_type"] == "freq_factors"
    ids = np.array([tokenizer.encode("the quick brown fox jumps over the lazy dog. pack my box " * 4)])
    assert ids.shape[1] > 64
    assert_close(loaded.model(ids), model(ids), rtol=1e-5, what="factors from the file")
    llama_cpp = pytest.importorskip("llama_cpp")
    ref = llama_cpp.Llama(model_path=str(path), n_ctx=128, n_threads=2, verbose=False)
    ref.eval(ids[0].tolist())
    theirs = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ref._ctx.ctx, -1), shape=(ref.n_vocab(),))
    assert_close(loaded.model(ids)[0, -1], theirs, rtol=1e-3, what="llama.cpp with rope_freqs")


# ----------------------------------------------------------------------------- window-only KV caches

@pytest.mark.parametrize("arch, extra", [CASES[5], CASES[7], CASES[9]], ids=["mistral", "gemma3", "gemma3-3"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_sliding_layers_keep_only_their_window_and_decode_as_recomputation(arch, extra, dtype):
    """A cache whose sliding layers hold window - 1 + step_limit positions: token by token, in
    chunks longer than step_limit (split), and ragged batches, each step's logits are the full
    forward pass's, far past the window; and its buffers are that small."""
    from pyllm.models import KVCache

    model = random_model(arch, extra, seed=11)
    cfg = model.config
    ids = (np.arange(1, 39)[None, :] * 5) % cfg.vocab_size
    full = model(ids)[0]
    cache = KVCache(cfg, 1, 40, dtype, step_limit=3)
    window = max(cfg.layer_window(i) for i in range(cfg.n_layer))
    assert cache.k_window is not None and cache.k_window.shape[3] == window - 1 + 3
    assert cache.k_window.shape[0] == sum(cfg.layer_window(i) > 0 for i in range(cfg.n_layer))
    assert cache.k_all.shape[0] + cache.k_window.shape[0] == cfg.n_layer
    rtol = 1e-5 if dtype == np.float32 else 3e-3
    t = 0
    for width in (7, 1, 1, 2, 5, 1, 3, 1, 1, 8, 1, 1, 1, 1, 1, 1, 1, 1):   # 38 positions in all
        logits = model.forward_step(ids[:, t:t + width], cache)
        t += width
        assert_close(logits[0], full[t - 1], rtol=rtol, what=f"position {t - 1}")
    assert t == ids.shape[1] and cache.starts[0] > 0
    # A ragged batch of prompts, one longer than step_limit, then decoding: each row as alone.
    prompts = [ids[0, :11], ids[0, 3:5], ids[0, 20:27]]
    batch = KVCache(cfg, 3, 40, dtype, step_limit=3)
    padded = np.zeros((3, 11), np.int64)
    for b, p in enumerate(prompts):
        padded[b, :p.size] = p
    counts = np.array([p.size for p in prompts])
    logits = model.forward_step(padded, batch, counts=counts)
    for b, p in enumerate(prompts):
        assert_close(logits[b], model(p[None, :])[0, -1], rtol=rtol, what=f"prompt {b}")
    assert list(batch.lengths) == list(counts)
    for step in range(9):
        nxt = np.argmax(logits, axis=1)
        logits = model.forward_step(nxt[:, None], batch)
        for b in range(3):
            prompts[b] = np.append(prompts[b], nxt[b])
            assert_close(logits[b], model(prompts[b][None, :])[0, -1], rtol=rtol, what=f"row {b} step {step}")


def test_window_buffers_go_back_only_where_they_still_hold_what_the_next_query_sees():
    from pyllm.models import KVCache

    cfg = config_of("llama", dict(n_kv_head=2, sliding_window=4))
    model = Model(cfg, seed=1)
    cache = KVCache(cfg, 2, 40, step_limit=2)
    model.forward_step(np.arange(1, 13)[None, :].repeat(2, 0), cache)   # 12 positions: dropped some
    assert cache.starts[0] > 0 and cache.keep == 3
    start = int(cache.starts[0])
    assert cache.truncatable(0, 12) and cache.truncatable(0, start + 3) and not cache.truncatable(0, start + 2)
    assert cache.truncatable(0, 0) and not cache.truncatable(0, 13)
    with pytest.raises(ValueError, match="cannot go back"):
        cache.truncate(0, 1)
    cache.truncate(1, 0)
    assert cache.lengths[1] == 0 and cache.starts[1] == 0
    # A whole model's shape: Gemma 3 270M's cache of its 32768 positions, its 15 sliding layers'
    # part the size of their 512-key window.
    gemma = ModelConfig.preset("gemma3-270m", vocab_size=1000)
    per_layer = KVCache(gemma, 1, 32768, np.float16)
    assert per_layer.k_window.shape == (15, 1, 1, 511 + 256, 256) and per_layer.k_all.shape == (3, 1, 1, 32768, 256)
    whole = 2 * 18 * 32768 * 256 * 2
    assert (per_layer.k_all.nbytes + per_layer.k_window.nbytes) * 2 < whole / 5


GEMMA_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'assistant' %}"
                  "{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
                  "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
                  "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}")


def test_a_gemma3_gguf_chats_in_its_template_and_stops_at_the_end_of_its_turn(tmp_path):
    """Gemma's files name <eos> as their end token; its turns end with <end_of_turn>: a chat read
    from the GGUF stops at either, renders Gemma's template with its begin token, and a model
    that says <end_of_turn> at once answers nothing more."""
    pytest.importorskip("gguf")
    from pyllm.llm import LLM
    from pyllm.tokenizer import Tokenizer

    specials = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"]
    tok = Tokenizer.train(TEXT, 300, pattern="gpt2", special_tokens=specials, progress=False)
    cfg = config_of("gemma3", {**FAMILIES["gemma3"][0], "vocab_size": tok.vocab_size, "n_embd": 64,
                               "intermediate_size": 96, "layer_types": None, "sliding_window": 6,
                               "rope_local_theta": 1e4, "query_pre_attn_scalar": None,
                               "final_logit_softcapping": None})
    model = Model(cfg, seed=2)
    end = tok.special_tokens["<end_of_turn>"]
    model.p["model.embed_tokens.weight"][end] *= 400.0   # tied head: every position's top token
    llm = LLM(model, tok, GEMMA_TEMPLATE, [tok.special_tokens["<eos>"]], bos_token="<bos>")
    llm.save_gguf(tmp_path / "g.gguf", "f32", progress=False)
    back = LLM.load(tmp_path / "g.gguf")
    import dataclasses
    assert dataclasses.replace(back.model.config, norm_eps=cfg.norm_eps) == cfg   # eps stored as float32
    assert set(back.stop_token_ids) == {tok.special_tokens["<eos>"], end}
    messages = [{"role": "user", "content": "the quick brown fox"}]
    assert back.apply_chat_template(messages) == "<bos><start_of_turn>user\nthe quick brown fox<end_of_turn>\n" \
                                                 "<start_of_turn>model\n"
    assert back.encode_prompt(back.apply_chat_template(messages))[0] == tok.special_tokens["<bos>"]
    assert back.chat(messages, temperature=0, max_new_tokens=20) == ""
