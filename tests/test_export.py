"""GGUF export: pyllm's quantizers against ggml's (the gguf package's numpy port of
quantize_row_*_ref, and llama.cpp's own quantizer for Q4_K) bit for bit, and trained models of
each architecture written at each type (q4_k: their narrow rows fall back to Q8_0),
read back by pyllm and loaded by llama.cpp with the same greedy text (float files) or next token
(quantized files)."""

import numpy as np
import pytest

from conftest import quick_train
from pyllm import kernels, reference
from pyllm.llm import LLM
from pyllm.model import Model, ModelConfig
from pyllm.tokenizer import Tokenizer

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize as ggml_dequantize  # noqa: E402
from gguf.quants import quantize as ggml_quantize  # noqa: E402

NAMES = ("Q8_0", "Q4_0", "Q4_1")
TEXT = ("the cat sat on the mat. the dog ran to the park and the cat sat on the dog. "
        "a bird flew over the house and the dog barked at the bird. ")


def awkward(rows: int, K: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, K)).astype(np.float32)
    w[0] = 0.0                                          # an all-zero row: scale 0
    if rows > 3:
        w[1, :32] = np.arange(32) - 15.5                    # halves: rounding ties
        w[2] *= 1e4                                         # large magnitudes (float16 minimums near their top)
        w[3, :32] = -np.abs(w[3, :32])                      # the largest value negative
        w[3, 5] = -9.0
    if rows > 5:
        w[4, 32:64] = 1e-8                                  # scales below float16's smallest normal
        w[5, :32] = 7.0                                     # a constant block
    return w


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("rows, K", [(7, 64), (1, 32), (33, 96), (3, 4096)])
def test_quantize_writes_ggml_s_bytes(name, rows, K):
    w = awkward(rows, K)
    t = kernels.QUANT_TYPES[name]
    ours = kernels.quantize(w, t)
    assert ours.shape == (rows, kernels.row_bytes(t, K))
    np.testing.assert_array_equal(ours, reference.quantize(w, t))
    np.testing.assert_array_equal(ours.reshape(-1), ggml_quantize(w, getattr(gguf.GGMLQuantizationType, name)).reshape(-1))
    # ggml's own decoding of pyllm's blocks is pyllm's.
    theirs = ggml_dequantize(ours, getattr(gguf.GGMLQuantizationType, name)).reshape(rows, K)
    np.testing.assert_array_equal(kernels.dequantize(ours, t, (rows, K)), theirs)


@pytest.mark.parametrize("rows, K", [(6, 256), (1, 512), (9, 768)])
def test_q4_k_blocks_equal_the_twin(rows, K):
    """Q4_K (gguf's numpy port has no quantizer for it): C++ against the twin, bit for bit; against
    llama.cpp's own quantizer in the test below."""
    w = awkward(rows, K) * np.random.default_rng(1).uniform(0.01, 3, (rows, 1)).astype(np.float32)
    t = kernels.QUANT_TYPES["Q4_K"]
    ours = kernels.quantize(w, t)
    np.testing.assert_array_equal(ours, reference.quantize(w, t))
    np.testing.assert_array_equal(kernels.dequantize(ours, t, (rows, K)),
                                  ggml_dequantize(ours, gguf.GGMLQuantizationType.Q4_K).reshape(rows, K))
    scale = np.abs(w).max(axis=1, keepdims=True) + 1e-30
    assert (np.abs(kernels.dequantize(ours, t, (rows, K)) - w) / scale).max() < 0.1


def test_q4_k_blocks_are_llama_cpp_s(tmp_path):
    """A model written as F32, quantized by llama.cpp to Q4_K_S: every tensor it made Q4_K holds the
    bytes pyllm's quantizer makes of the same values."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from pyllm.io import gguf_model
    from pyllm.io.gguf import GGUFFile

    tok = Tokenizer.train([TEXT * 10], 290, pattern="gpt2", special_tokens=["<|endoftext|>"], progress=False)
    model = Model(ModelConfig(arch="llama", vocab_size=512, block_size=64, n_layer=2, n_head=4, n_kv_head=2,
                              n_embd=256, intermediate_size=512), seed=0)
    model.params[...] = np.random.default_rng(2).standard_normal(model.params.size).astype(np.float32) * 0.05
    LLM(model, tok).save_gguf(tmp_path / "f32.gguf", "f32", progress=False)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_S
    assert llama_cpp.llama_model_quantize(str(tmp_path / "f32.gguf").encode(), str(tmp_path / "q4k.gguf").encode(),
                                          params) == 0
    src, made = GGUFFile(tmp_path / "f32.gguf"), GGUFFile(tmp_path / "q4k.gguf")
    t = kernels.QUANT_TYPES["Q4_K"]
    compared = 0
    for name, info in made.tensors.items():
        if info.type == t:
            ours = kernels.quantize(gguf_model.tensor(src, name), t)
            np.testing.assert_array_equal(ours.reshape(-1), made.raw(info).reshape(-1), err_msg=name)
            compared += 1
    assert compared >= 8


def test_quantize_refuses_what_it_cannot_write():
    with pytest.raises(ValueError, match="multiple of 32"):
        kernels.quantize(np.zeros((2, 33), np.float32), kernels.QUANT_TYPES["Q8_0"])
    with pytest.raises(ValueError, match="NaN"):
        kernels.quantize(np.full((1, 32), np.nan, np.float32), kernels.QUANT_TYPES["Q8_0"])
    with pytest.raises(ValueError, match="multiple of 256"):
        kernels.quantize(np.zeros((1, 288), np.float32), kernels.QUANT_TYPES["Q4_K"])
    with pytest.raises(ValueError, match="writes"):
        kernels.quantize(np.zeros((1, 256), np.float32), kernels.QUANT_TYPES["Q6_K"])


# ----------------------------------------------------------------------------- whole models

@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train([TEXT * 20], 300, pattern="gpt2", special_tokens=["<|endoftext|>"], progress=False)


SHAPES = {
    "llama": dict(n_kv_head=2),
    "qwen3": dict(n_kv_head=2, head_dim=32),
    "gemma3": dict(n_kv_head=1, head_dim=32, n_layer=6, sliding_window=6, rope_local_theta=1e4),  # as llama.cpp's
    "gpt2": dict(),
}


@pytest.fixture(scope="module", params=list(SHAPES))
def trained(request, tokenizer):
    """A small model of each architecture trained for a few seconds (peaked next-token guesses)."""
    arch = request.param
    model = Model(ModelConfig(**{"arch": arch, "vocab_size": tokenizer.vocab_size, "block_size": 128, "n_layer": 2,
                                 "n_head": 4, "n_embd": 64, "intermediate_size": 128, **SHAPES[arch]}), seed=0)
    quick_train(model, tokenizer.encode(TEXT * 30), 80, 48)
    template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|endoftext|>{% endfor %}"
    return LLM(model, tokenizer, chat_template=template)


def _llama_cpp_greedy(path, prompt: list, n: int) -> tuple:
    """llama.cpp's greedy tokens after prompt, and its logits after the last of them."""
    llama_cpp = pytest.importorskip("llama_cpp")
    ref = llama_cpp.Llama(model_path=str(path), n_ctx=128, n_threads=2, verbose=False)
    ref.eval(prompt)
    out = []
    for _ in range(n):
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ref._ctx.ctx, -1), shape=(ref.n_vocab(),))
        out.append(int(np.argmax(logits)))
        ref.eval([out[-1]])
    return out, np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ref._ctx.ctx, -1), shape=(ref.n_vocab(),)).copy()


@pytest.mark.parametrize("type", ["f32", "f16", "q8_0", "q4_0", "q4_1", "q4_k"])
def test_exported_files_load_in_pyllm_and_llama_cpp_alike(trained, type, tmp_path, tokenizer):
    path = tmp_path / f"model.{type}.gguf"
    trained.save_gguf(path, type, progress=False)
    back = LLM.load(path)
    cfg, theirs = trained.model.config, back.model.config
    assert (theirs.arch, theirs.n_layer, theirs.n_head, theirs.n_kv_head, theirs.head_size, theirs.vocab_size) == \
        (cfg.arch, cfg.n_layer, cfg.n_head, cfg.n_kv_head, cfg.head_size, cfg.vocab_size)
    assert back.tokenizer.encode(TEXT) == tokenizer.encode(TEXT) and back.chat_template == trained.chat_template
    assert back.stop_token_ids == trained.stop_token_ids
    prompt = tokenizer.encode("the dog ran to the")
    ids = np.array([prompt])
    if type == "f32":   # the same weights: the same logits
        np.testing.assert_allclose(back.model(ids), trained.model(ids), rtol=1e-5, atol=1e-5)
    ours = back.model.generate(prompt, 12, temperature=0)[len(prompt):].tolist()
    theirs_tokens, theirs_logits = _llama_cpp_greedy(path, prompt, 12)
    if type in ("f32", "f16"):
        assert theirs_tokens == ours          # the greedy text
        # and the logits after it (past gemma3's window of 6), within llama.cpp's float16 rounding
        last = back.model(np.array([prompt + ours]))[0, -1]
        assert np.abs(last - theirs_logits).max() <= 2e-3 * np.abs(theirs_logits).max()
    else:
        assert theirs_tokens[0] == ours[0]    # the next token (the rest may part where two nearly tie)


@pytest.mark.parametrize("trained", ["llama"], indirect=True)
def test_cli_export_of_a_folder_with_an_adapter_merged(trained, tmp_path):
    from pyllm.cli import main as cli
    from pyllm.lora import LoRA, LoRAConfig

    folder = tmp_path / "model"
    trained.save(folder)
    lora = LoRA(trained.model, LoRAConfig(rank=4, alpha=8))
    lora.B[next(iter(lora.B))][...] = 0.05   # an adapter that changes the output
    lora.save(tmp_path / "adapter")
    assert cli(["export", "--model", str(folder), "--adapter", str(tmp_path / "adapter"),
                "--out", str(tmp_path / "out.gguf"), "--type", "f32"]) == 0
    adapted = LLM.load(folder)
    adapted.model.lora = LoRA.load(adapted.model, tmp_path / "adapter")
    ids = np.array([trained.tokenizer.encode("the cat sat")])
    exported = LLM.load(tmp_path / "out.gguf")
    np.testing.assert_allclose(exported.model(ids), adapted.model(ids), rtol=1e-4, atol=1e-4)
    with pytest.raises(SystemExit):
        cli(["export", "--model", str(folder), "--out", str(tmp_path / "x.gguf"), "--type", "q6_k"])
