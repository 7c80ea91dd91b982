"""GPT-2 models in GGUF files: written by the `gguf` package's writer from a random pyllm model (float
and quantized tensors, llama.cpp's names and (out, in) layout), loaded with the matrices kept
quantized, and compared with the float model, with llama.cpp on the same file, and under LoRA."""

import numpy as np
import pytest

from conftest import add_gguf_vocabulary
from pyllm.llm import LLM
from pyllm.lora import LoRA, LoRAConfig
from pyllm.model import Model, ModelConfig
from pyllm.tokenizer import Tokenizer

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402
from gguf.quants import quantize  # noqa: E402

TEXT = "the quick brown fox jumps over the lazy dog. " * 40 + "pack my box with five dozen liquor jugs. " * 40
CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
GGUF_LAYER = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
              "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}


def write_gpt2_gguf(path, model: Model, tokenizer: Tokenizer, types: dict) -> None:
    """A GGUF file of a GPT-2 model as llama.cpp's converter writes one; `types` gives the ggml type
    of each GGUF matrix name's suffix (e.g. {"attn_qkv": T.Q8_0}), F32 for the rest."""
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_context_length(cfg.block_size)
    w.add_embedding_length(cfg.n_embd)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_block_count(cfg.n_layer)
    w.add_head_count(cfg.n_head)
    w.add_layer_norm_eps(cfg.norm_eps)
    add_gguf_vocabulary(w, tokenizer)
    names = {"transformer.wte.weight": "token_embd.weight", "transformer.wpe.weight": "position_embd.weight",
             "transformer.ln_f.weight": "output_norm.weight", "transformer.ln_f.bias": "output_norm.bias",
             "lm_head.weight": "output.weight"}
    for name, value in model.state_dict().items():
        if name in names:
            target = names[name]
        else:
            _, _, layer, rest = name.split(".", 3)
            module, part = rest.rsplit(".", 1)
            target = f"blk.{layer}.{GGUF_LAYER[module]}.{part}"
            if module in CONV1D and part == "weight":
                value = value.T      # llama.cpp stores every matrix (out, in)
        value = np.ascontiguousarray(value, np.float32)
        kind = types.get(target.split(".")[-2], T.F32) if value.ndim == 2 else T.F32
        if kind == T.F32:
            w.add_tensor(target, value)
        else:
            w.add_tensor(target, quantize(value, kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(TEXT, 320, pattern="gpt2", special_tokens=["<|endoftext|>"], progress=False)


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def gpt2(request, tokenizer, tmp_path_factory):
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, block_size=64, n_layer=2, n_head=4, n_embd=64,
                      tie_word_embeddings=request.param)
    model = Model(cfg, seed=3)
    rng = np.random.default_rng(4)
    model.params[...] += rng.standard_normal(model.params.size).astype(np.float32) * 0.02
    path = tmp_path_factory.mktemp("gguf") / "gpt2.gguf"
    write_gpt2_gguf(path, model, tokenizer, {"attn_qkv": T.Q8_0, "attn_output": T.Q4_0, "ffn_up": T.Q4_1,
                                             "ffn_down": T.Q8_0, "token_embd": T.Q8_0, "output": T.Q4_0})
    return model, path


def test_a_gpt2_gguf_loads_with_its_matrices_quantized(gpt2, tokenizer):
    model, path = gpt2
    llm = LLM.load(path)
    loaded = llm.model
    assert loaded.config.arch == "gpt2" and loaded.config.n_embd == 64
    assert loaded.config.tie_word_embeddings == model.config.tie_word_embeddings
    kept = set(loaded.quantized)
    assert {f"transformer.h.{i}.{m}.weight" for i in range(2) for m in CONV1D} <= kept
    assert "transformer.wte.weight" in kept and "transformer.wpe.weight" not in kept
    # Float activations: the products are exactly the dequantized weights', so the quantized model
    # equals the same file read as float32 (GPT-2's Conv1D layout restored).
    full = Model.from_gguf(path, dequantize=True)
    assert not full.quantized and full.p["transformer.h.0.attn.c_attn.weight"].shape == (64, 192)
    ids = np.array([tokenizer.encode("the lazy fox")])
    loaded.int8_activations = False
    try:
        ours = loaded(ids)
    finally:
        loaded.int8_activations = True
    ref = full(ids)
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()
    # ... and both are the original model, up to the blocks' rounding (4-bit blocks of random weights
    # move logits by ~10%; a misread layout would leave them uncorrelated).
    original = model(ids)
    assert np.corrcoef(ref.reshape(-1), original.reshape(-1))[0, 1] > 0.99
    state, again = full.state_dict(), loaded.state_dict()
    for name, value in state.items():
        np.testing.assert_allclose(again[name], value, rtol=1e-6, atol=1e-6, err_msg=name)


def test_a_quantized_gpt2_generates_as_its_float_twin(gpt2, tokenizer):
    _, path = gpt2
    llm = LLM.load(path)
    full = Model.from_gguf(path, dequantize=True)
    prompt = tokenizer.encode("pack my box")
    llm.model.int8_activations = False
    try:
        tokens = llm.model.generate(prompt, 12, temperature=0)
    finally:
        llm.model.int8_activations = True
    assert tokens.tolist() == full.generate(prompt, 12, temperature=0).tolist()
    text = llm.generate("pack my box", 12, temperature=0)    # int8 activations, as llama.cpp
    assert isinstance(text, str) and llm.stop_token_ids == [tokenizer.special_tokens["<|endoftext|>"]]


def test_lora_on_a_quantized_gpt2_equals_lora_on_its_float_twin(gpt2, tokenizer):
    _, path = gpt2
    quantized, full = Model.from_gguf(path), Model.from_gguf(path, dequantize=True)
    ids = np.array([tokenizer.encode("the quick brown fox jumps")])
    targets = np.roll(ids, -1, axis=1)
    grads = []
    for model in (quantized, full):
        model.lora = LoRA(model, LoRAConfig(rank=4, seed=1))
        model.lora.B[...] = 0.01        # nonzero, so the adapters change the output and get dA
        model.int8_activations = False
        model.lora.zero_grad()
        model.forward_backward(ids, targets)
        grads.append(model.lora.grads.copy())
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-3, atol=1e-6 * np.abs(grads[1]).max())


def test_llama_cpp_reads_the_same_gpt2_file(gpt2, tokenizer):
    llama_cpp = pytest.importorskip("llama_cpp")
    _, path = gpt2
    llm = LLM.load(path)
    ref = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=2, logits_all=False, verbose=False)
    ids = tokenizer.encode("the quick brown")
    ref.eval(ids)
    theirs = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ref._ctx.ctx, -1), shape=(ref.n_vocab(),))
    ours = llm.model(np.array([ids]))[0, -1]
    assert int(np.argmax(ours)) == int(np.argmax(theirs))
    assert np.abs(ours - theirs).max() <= 0.05 * np.abs(theirs).max()
