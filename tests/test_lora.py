"""LoRA adapters against peft + transformers on the same weights: logits, gradients, files."""

import json

import numpy as np
import pytest

from pyllm.lora import LoRA, LoRAConfig
from pyllm.model import Model, ModelConfig

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

LLAMA = dict(arch="llama", vocab_size=71, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
             intermediate_size=96, rope_theta=500.0, norm_eps=1e-6)


def close(ours, theirs, rtol=1e-4, what=""):
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    err = np.abs(ours - theirs).max() / max(np.abs(theirs).max(), 1e-6)
    assert err <= rtol, f"{what}: max error {err:.2e} of the largest magnitude"


GPT2 = dict(vocab_size=71, block_size=32, n_layer=2, n_head=4, n_embd=32)


def setup(targets=None, rank=4, arch="llama"):
    """A model with a trained-looking adapter (B no longer zero) and its peft + transformers twin."""
    from pyllm.io.hf import config_to_hf

    model = Model(ModelConfig(**(LLAMA if arch == "llama" else GPT2)), seed=1)
    lora = LoRA(model, LoRAConfig(rank=rank, alpha=8.0, targets=targets, seed=2))
    rng = np.random.default_rng(3)
    for base in lora.sites:
        lora.B[base][...] = rng.standard_normal(lora.B[base].shape).astype(np.float32) * 0.05
    hf_config, hf_model = ((transformers.LlamaConfig, transformers.LlamaForCausalLM) if arch == "llama" else
                           (transformers.GPT2Config, transformers.GPT2LMHeadModel))
    cfg = hf_config(**config_to_hf(model.config))
    cfg._attn_implementation = "eager"
    base = hf_model(cfg)
    base.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in model.state_dict().items()}, strict=False)
    base.tie_weights()
    twin = peft.get_peft_model(base, peft.LoraConfig(r=rank, lora_alpha=8.0, target_modules=list(lora.targets),
                                                     lora_dropout=0.0, bias="none", fan_in_fan_out=lora.transposed))
    twin.load_state_dict({k.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight",
                                                                                           ".lora_B.default.weight"):
                          torch.from_numpy(v.copy()) for k, v in lora.state_dict().items()}, strict=False)
    twin.eval()
    return model, lora, twin


def assert_equal_to_peft(model, lora, twin, seed=4):
    """Logits and every adapter gradient equal the twin's on a random batch; no base gradients."""
    rng = np.random.default_rng(seed)
    ids, targets = rng.integers(0, 71, (2, 11)), rng.integers(0, 71, (2, 11))
    t_logits = twin(torch.from_numpy(ids)).logits
    close(model(ids), t_logits.detach().numpy(), what="logits")
    torch.nn.functional.cross_entropy(t_logits.reshape(-1, 71), torch.from_numpy(targets).reshape(-1)).backward()
    lora.zero_grad()
    model.zero_grad()
    model.forward_backward(ids, targets)
    named = dict(twin.named_parameters())
    for base in lora.sites:
        module = "base_model.model." + base[: -len(".weight")]
        close(lora.gA[base], named[module + ".lora_A.default.weight"].grad.numpy(), what=base + " A")
        close(lora.gB[base], named[module + ".lora_B.default.weight"].grad.numpy(), what=base + " B")
    assert not model.grads.any(), "the frozen base weights received gradients"


def test_a_fresh_adapter_changes_nothing():
    model = Model(ModelConfig(**LLAMA), seed=1)
    ids = np.random.default_rng(0).integers(0, 71, (2, 9))
    before = model(ids)
    model.lora = LoRA(model, LoRAConfig(rank=4))
    np.testing.assert_array_equal(model(ids), before)


@pytest.mark.parametrize("targets", [("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                                     ("q_proj", "v_proj")])
def test_logits_and_adapter_gradients_equal_peft(targets):
    model, lora, twin = setup(targets)
    model.lora = lora
    assert_equal_to_peft(model, lora, twin)


def test_merged_equals_unmerged_and_peft_loads_the_saved_adapter(tmp_path):
    model, lora, twin = setup()
    model.lora = lora
    ids = np.random.default_rng(5).integers(0, 71, (1, 12))
    adapted = model(ids)
    twin.save_pretrained(tmp_path / "from-peft")            # peft's own files load in pyllm
    model.lora = LoRA.load(model, tmp_path / "from-peft")
    close(model(ids), adapted, rtol=1e-6, what="peft's saved adapter in pyllm")
    model.lora = lora
    lora.save(tmp_path / "adapter")
    loaded = peft.PeftModel.from_pretrained(twin.unload(), tmp_path / "adapter")   # the bare base + our file
    loaded.eval()
    with torch.no_grad():
        close(adapted, loaded(torch.from_numpy(ids)).logits.numpy(), what="peft with our saved adapter")
    again = LoRA.load(model, tmp_path / "adapter")
    model.lora = again
    close(model(ids), adapted, rtol=1e-6, what="reloaded adapter")
    model.lora = None
    lora.merge_into(model)
    close(model(ids), adapted, rtol=1e-5, what="merged")


def test_lora_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="gpt2 model's LoRA targets"):
        LoRA(Model(ModelConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=16)),
             LoRAConfig(targets=("q_proj",)))
    with pytest.raises(ValueError, match="targets"):
        LoRAConfig(targets=("wte",))


def test_adapter_dropout_equals_peft_with_the_same_masks():
    model, lora, twin = setup(rank=4)
    lora.config.dropout = 0.3
    model.lora = lora
    lora.dropout_seed = 1234
    rng = np.random.default_rng(6)
    ids, targets_ = rng.integers(0, 71, (2, 7)), rng.integers(0, 71, (2, 7))

    class SameMask(torch.nn.Module):   # peft's dropout module, given our mask for its site
        def __init__(self, base):
            super().__init__()
            self.base = base

        def forward(self, x):
            mask = lora.dropout_mask(self.base, (x.shape[0] * x.shape[1], x.shape[2]))
            return x * torch.from_numpy(mask).reshape(x.shape)

    for name, module in twin.named_modules():
        if hasattr(module, "lora_dropout") and "default" in module.lora_dropout:
            module.lora_dropout["default"] = SameMask(name.replace("base_model.model.", "") + ".weight")
    t_logits = twin(torch.from_numpy(ids)).logits
    ours = model(ids)
    close(ours, t_logits.detach().numpy(), what="logits with dropout")
    torch.nn.functional.cross_entropy(t_logits.reshape(-1, 71), torch.from_numpy(targets_).reshape(-1)).backward()
    lora.zero_grad()
    model.forward_backward(ids, targets_)
    named = dict(twin.named_parameters())
    for base in lora.sites:
        module = "base_model.model." + base[: -len(".weight")]
        close(lora.gA[base], named[module + ".lora_A.default.weight"].grad.numpy(), what=base + " A")
        close(lora.gB[base], named[module + ".lora_B.default.weight"].grad.numpy(), what=base + " B")
    lora.dropout_seed = None      # outside a training step dropout is off
    assert not np.allclose(model(ids), ours)


def _q8_0(weight):
    """ggml Q8_0 blocks of a float (N, K) matrix: per 32 values a float16 scale and 32 int8s."""
    from pyllm import reference as R

    q, d = R.quantize_activations(weight)
    blocks = np.concatenate([d.astype(np.float16).view(np.uint8).reshape(-1, 2), q.view(np.uint8).reshape(-1, 32)], 1)
    return np.ascontiguousarray(blocks.reshape(weight.shape[0], -1))


def _q8_0_model(cfg, seed: int, fused: bool):
    """A random model of cfg with every matrix kept as Q8_0 blocks (q, k, v also as one fused
    block, as the GGUF loader keeps them, when fused), the rest float."""
    from pyllm.model import QuantizedWeight

    dense = Model(cfg, seed=seed)
    quantized = {name: QuantizedWeight(_q8_0(w), 8, w.shape)
                 for name, w in dense.p.items() if w.ndim == 2 and "norm" not in name}
    h = "model.layers.{}.self_attn."
    for i in range(cfg.n_layer if fused else 0):
        parts = [quantized[h.format(i) + f"{x}_proj.weight"] for x in "qkv"]
        quantized[h.format(i) + "qkv"] = QuantizedWeight(np.concatenate([p.data for p in parts]), 8,
                                                         (sum(p.shape[0] for p in parts), cfg.n_embd))
    kept = Model(cfg, seed=None, quantized=quantized)
    for name in kept.p:
        kept.p[name][...] = dense.p[name]
    return kept


@pytest.mark.parametrize("fused", [True, False], ids=["qkv-fused", "qkv-apart"])
def test_lora_on_a_quantized_base_equals_lora_on_its_float_twin(fused):
    """fused: q, k, v in one quantized product (one type, as GGUF loading fuses them), or three
    (their types differ in llama.cpp's Q4_K_M files)."""
    kept = _q8_0_model(ModelConfig(**LLAMA), 1, fused)
    kept.int8_activations = False
    twin = kept.dequantized()            # the same (rounded) weights in float32
    assert not twin.quantized
    rng = np.random.default_rng(7)
    ids, targets_ = rng.integers(0, 71, (2, 9)), rng.integers(0, 71, (2, 9))
    with pytest.raises(ValueError, match="LoRA"):
        kept.forward_backward(ids, targets_)
    for model in (kept, twin):
        model.lora = LoRA(model, LoRAConfig(rank=4, seed=2))
        for base in model.lora.sites:
            model.lora.B[base][...] = np.random.default_rng(len(base)).standard_normal(model.lora.B[base].shape) * 0.05
    close(kept(ids), twin(ids), rtol=1e-5, what="logits")
    for model in (kept, twin):
        model.lora.zero_grad()
        model.forward_backward(ids, targets_)
    close(kept.lora.grads, twin.lora.grads, rtol=1e-4, what="adapter gradients")
    with pytest.raises(ValueError, match="quantized"):
        kept.lora.merge_into(kept)


def test_fused_parts_off_the_packed_row_groups_are_packed_on_their_own():
    """q, k and v of 96, 8 and 8 rows: k and v do not start on a group of 16 packed rows, so they
    cannot be row ranges of the packed q|k|v; each is packed on its own, and both the fused
    product and the parts give the float twin's results."""
    from pyllm import kernels
    from pyllm.model import KVCache

    cfg = ModelConfig(**{**LLAMA, "n_embd": 96, "n_head": 12, "n_kv_head": 1})
    kept = _q8_0_model(cfg, 3, fused=True)
    h = "model.layers.{}.self_attn."
    whole, k_part = kept.quantized[h.format(0) + "qkv"], kept.quantized[h.format(0) + "k_proj.weight"]
    assert whole.packed and k_part.packed and not np.shares_memory(whole.data, k_part.data)
    assert np.array_equal(k_part.dequantize(), whole.dequantize()[96:104])
    assert 104 % kernels.PACKED_ROWS
    ids = np.random.default_rng(4).integers(0, 71, (1, 7))
    for int8 in (False, True):
        kept.int8_activations = int8
        full = kept(ids)
        cache = KVCache(cfg, 1, 8)
        for t in range(ids.shape[1]):
            step = kept.forward_step(ids[:, t:t + 1], cache)
        close(step, full[:, -1], rtol=1e-3 if int8 else 1e-5, what=f"decode, int8 activations {int8}")
    kept.int8_activations = False
    close(kept(ids), kept.dequantized()(ids), rtol=1e-5, what="logits against the float twin")


def test_gpt2_adapters_equal_peft_and_merge(tmp_path):
    """GPT-2 (pyllm's own trained models): adapters on c_attn, both c_proj and c_fc, whose weights
    are stored (in, out) as HF's Conv1D; peft treats them with fan_in_fan_out."""
    from pyllm.model import KVCache

    model, lora, twin = setup(arch="gpt2")
    assert len(lora.sites) == 2 * 4
    model.lora = lora
    assert_equal_to_peft(model, lora, twin)
    ids = np.random.default_rng(5).integers(0, 71, (1, 12))
    cache = KVCache(model.config, 1, 16)                  # cached decoding sees the adapters too
    close(model.forward_step(ids, cache), model(ids)[:, -1], rtol=1e-5, what="cached decode")
    adapted = model(ids)
    lora.save(tmp_path / "adapter")
    loaded = peft.PeftModel.from_pretrained(twin.unload(), tmp_path / "adapter")
    loaded.eval()
    with torch.no_grad():
        close(adapted, loaded(torch.from_numpy(ids)).logits.numpy(), what="peft with our saved adapter")
    model.lora = None
    lora.merge_into(model)
    close(model(ids), adapted, rtol=1e-5, what="merged")


def test_cli_applies_an_adapter_folder(tmp_path, capsys):
    """pyllm generate --adapter: the same text as the merged model."""
    from pyllm.cli import main as cli
    from pyllm.llm import LLM
    from pyllm.tokenizer import Tokenizer

    tok = Tokenizer.train(["abc def ghi " * 20], 270, progress=False)
    model = Model(ModelConfig(**{**GPT2, "vocab_size": tok.vocab_size}), seed=1)
    lora = LoRA(model, LoRAConfig(rank=4, alpha=8.0, seed=2))
    for base in lora.sites:
        lora.B[base][...] = np.random.default_rng(len(base)).standard_normal(lora.B[base].shape) * 0.2
    LLM(model, tok).save(tmp_path / "base")
    lora.save(tmp_path / "adapter")
    args = ["generate", "abc", "--model", str(tmp_path / "base"), "--temperature", "0", "--max-new-tokens", "12"]
    assert cli(args + ["--adapter", str(tmp_path / "adapter")]) == 0
    adapted = capsys.readouterr().out
    model.lora = None
    lora.merge_into(model)
    LLM(model, tok).save(tmp_path / "merged")
    assert cli(["generate", "abc", "--model", str(tmp_path / "merged")] + args[4:]) == 0
    assert capsys.readouterr().out == adapted
    assert cli(args) == 0 and capsys.readouterr().out != adapted      # the adapter made a difference
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    assert cli(args + ["--adapter", str(tmp_path / "adapter")]) == 1
    assert "use_dora" in capsys.readouterr().err


def test_llama_decoding_token_by_token_sees_the_adapters():
    """One sequence, one token per step (forward_step's view-only path): the logits of each step
    equal the full forward's at that position, with and without adapters."""
    from pyllm.model import KVCache

    model, lora, _ = setup()
    ids = np.random.default_rng(8).integers(0, 71, (1, 10))
    for adapters in (None, lora):
        model.lora = adapters
        full = model(ids)[0]
        cache = KVCache(model.config, 1, 16)
        for t in range(ids.shape[1]):
            close(model.forward_step(ids[:, t:t + 1], cache)[0], full[t], rtol=1e-5, what=f"step {t}")
