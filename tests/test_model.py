"""pyllm.Model against torch autograd (transformers' GPT2LMHeadModel with the same weights), and its files."""

import json

import numpy as np
import pytest

import pyllm
from conftest import hf_twin
from pyllm.model import Model, ModelConfig

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=97, block_size=24, n_layer=2, n_head=3, n_embd=48)


def torch_twin(model: Model):
    """transformers' GPT-2 with the weights of `model` (float32, eager attention, no dropout)."""
    from pyllm.io.hf import config_to_hf

    cfg = transformers.GPT2Config(**config_to_hf(model.config))
    cfg._attn_implementation = "eager"
    twin = transformers.GPT2LMHeadModel(cfg)
    state = {k: torch.from_numpy(np.array(v)) for k, v in model.state_dict().items()}
    missing, unexpected = twin.load_state_dict(state, strict=False)
    assert not unexpected
    assert all(k == "lm_head.weight" or k.endswith(".attn.bias") for k in missing), missing
    twin.eval()
    return twin


def assert_close(ours, theirs, rtol=1e-4, what=""):
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    scale = max(np.abs(theirs).max(), 1e-6)
    err = np.abs(ours - theirs).max() / scale
    assert err <= rtol, f"{what}: max error {err:.2e} of the largest magnitude (limit {rtol})"


def batch(cfg, B, T, seed=1):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, cfg.vocab_size, (B, T))
    targets = rng.integers(0, cfg.vocab_size, (B, T))
    return ids, targets


@pytest.mark.parametrize("B,T,prompt", [(2, 24, 0), (1, 1, 0), (3, 7, 0), (2, 24, 15), (3, 7, 5)])
def test_logits_loss_and_every_gradient_match_torch_autograd(B, T, prompt):
    """prompt: the first positions of every row are not learned (target -100), as in fine-tuning,
    where logits are computed for the learned positions only."""
    cfg = ModelConfig(**SMALL)
    model = Model(cfg, seed=3)
    # Non-trivial norms and biases, so their gradients and uses are really checked.
    rng = np.random.default_rng(0)
    for spec in model.specs:
        if not spec.decay and "wte" not in spec.name and "wpe" not in spec.name:
            model.p[spec.name][...] += rng.standard_normal(spec.shape).astype(np.float32) * 0.1
    ids, targets = batch(cfg, B, T)
    if T > 1:
        targets[0, 0] = -100  # ignored positions take no part in the mean
    targets[:, :prompt] = -100
    twin = torch_twin(model)

    logits = model(ids)
    t_ids = torch.from_numpy(ids)
    t_logits = twin(t_ids).logits
    assert_close(logits, t_logits.detach().numpy(), what="logits")

    t_loss = torch.nn.functional.cross_entropy(t_logits.reshape(-1, cfg.vocab_size),
                                               torch.from_numpy(targets).reshape(-1), ignore_index=-100)
    t_loss.backward()
    model.zero_grad()
    loss = model.forward_backward(ids, targets)
    assert loss == pytest.approx(t_loss.item(), rel=1e-5)
    assert model.loss(ids, targets) == pytest.approx(loss, rel=1e-6)

    t_grads = dict(twin.named_parameters())
    for name, grad in model.named_grads().items():
        assert_close(grad, t_grads[name].grad.numpy(), what=name)


def test_untied_head_and_wider_mlp_match_torch():
    cfg = ModelConfig(**SMALL, tie_word_embeddings=False, intermediate_size=80)
    model = Model(cfg, seed=5)
    ids, targets = batch(cfg, 2, 9)
    twin = torch_twin(model)
    twin.lm_head.weight.data = torch.from_numpy(np.array(model.p["lm_head.weight"]))
    t_logits = twin(torch.from_numpy(ids)).logits
    assert_close(model(ids), t_logits.detach().numpy(), what="logits")
    torch.nn.functional.cross_entropy(t_logits.reshape(-1, cfg.vocab_size),
                                      torch.from_numpy(targets).reshape(-1)).backward()
    model.forward_backward(ids, targets)
    assert_close(model.g["lm_head.weight"], twin.lm_head.weight.grad.numpy(), what="lm_head")
    assert_close(model.g["transformer.wte.weight"], twin.transformer.wte.weight.grad.numpy(), what="wte")


def test_gradients_accumulate_over_micro_batches():
    cfg = ModelConfig(**SMALL)
    model = Model(cfg)
    ids, targets = batch(cfg, 4, 12)
    model.forward_backward(ids, targets)
    whole = model.grads.copy()
    model.zero_grad()
    model.forward_backward(ids[:2], targets[:2], loss_scale=0.5)
    model.forward_backward(ids[2:], targets[2:], loss_scale=0.5)
    assert_close(model.grads, whole, rtol=1e-5, what="accumulated gradients")


def test_same_seed_same_model_and_named_views_share_the_flat_buffer():
    cfg = ModelConfig(**SMALL)
    a, b = Model(cfg, seed=7), Model(cfg, seed=7)
    assert np.array_equal(a.params, b.params)
    assert not np.array_equal(a.params, Model(cfg, seed=8).params)
    state = a.state_dict()
    assert sum(v.size for v in state.values()) == a.num_params == a.params.size
    state["transformer.ln_f.bias"][0] = 42.0
    assert 42.0 in a.params
    assert set(a.named_grads()) == set(state)
    assert all(a.named_grads()[k].shape == v.shape for k, v in state.items())


def test_save_pretrained_loads_in_transformers_with_the_same_logits(tmp_path):
    cfg = ModelConfig(**SMALL)
    model = Model(cfg, seed=11)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "gpt2"
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path)
    theirs.eval()
    ids, _ = batch(cfg, 2, 10)
    with torch.no_grad():
        t_logits = theirs(torch.from_numpy(ids)).logits.numpy()
    assert_close(model(ids), t_logits, what="logits after transformers loads our folder")


@pytest.mark.parametrize("safe_serialization", [True])
def test_from_pretrained_reads_a_folder_transformers_wrote(tmp_path, safe_serialization):
    torch.manual_seed(0)
    hf_cfg = transformers.GPT2Config(vocab_size=61, n_positions=16, n_embd=32, n_layer=2, n_head=4)
    theirs = transformers.GPT2LMHeadModel(hf_cfg)
    theirs.eval()
    theirs.save_pretrained(tmp_path, safe_serialization=safe_serialization)
    model = Model.from_pretrained(tmp_path)
    assert model.config.vocab_size == 61 and model.config.block_size == 16
    ids = np.random.default_rng(0).integers(0, 61, (2, 16))
    with torch.no_grad():
        t_logits = theirs(torch.from_numpy(ids)).logits.numpy()
    assert_close(model(ids), t_logits, what="logits of a transformers-written folder")


def test_bad_input_is_refused_clearly(tmp_path):
    cfg = ModelConfig(**SMALL)
    model = Model(cfg)
    with pytest.raises(ValueError, match="block_size"):
        model(np.zeros((1, cfg.block_size + 1), np.int64))
    with pytest.raises(ValueError, match="outside"):
        model(np.array([[0, cfg.vocab_size]]))
    with pytest.raises(ValueError, match="integers"):
        model(np.zeros((1, 3), np.float32))
    with pytest.raises(ValueError, match="targets"):
        model.forward_backward(np.zeros((1, 3), np.int64), np.zeros((1, 4), np.int64))
    with pytest.raises(ValueError, match="n_embd"):
        ModelConfig(n_embd=50, n_head=3)
    with pytest.raises(ValueError, match="arch"):
        ModelConfig(arch="mamba")
    with pytest.raises(FileNotFoundError, match="config.json"):
        Model.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "gpt2", "vocab_size": 10')
    with pytest.raises(ValueError, match="JSON"):
        Model.from_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="safetensors"):
        Model.from_pretrained(tmp_path)


def test_public_names():
    assert pyllm.Model is Model and pyllm.ModelConfig is ModelConfig
    assert ModelConfig.preset("small").n_embd == 384


# ----------------------------------------------------------------------------- Llama family

LLAMA = dict(arch="llama", vocab_size=89, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
             intermediate_size=96, rope_theta=500.0, norm_eps=1e-6)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("n_kv_head", [2, 4, 1])
@pytest.mark.parametrize("prompt", [0, 10], ids=["all-learned", "prompt-masked"])
def test_llama_matches_transformers_logits_loss_and_gradients(tied, n_kv_head, prompt):
    cfg = ModelConfig(**{**LLAMA, "n_kv_head": n_kv_head}, tie_word_embeddings=tied)
    model = Model(cfg, seed=2)
    rng = np.random.default_rng(0)
    for spec in model.specs:
        if spec.name.endswith("norm.weight"):
            model.p[spec.name][...] += rng.standard_normal(spec.shape).astype(np.float32) * 0.2
    twin = hf_twin(model)
    ids, targets = batch(cfg, 2, 17)
    targets[:, :prompt] = -100
    t_logits = twin(torch.from_numpy(ids)).logits
    assert_close(model(ids), t_logits.detach().numpy(), what="logits")
    t_loss = torch.nn.functional.cross_entropy(t_logits.reshape(-1, cfg.vocab_size), torch.from_numpy(targets).reshape(-1),
                                               ignore_index=-100)
    t_loss.backward()
    loss = model.forward_backward(ids, targets)
    assert loss == pytest.approx(t_loss.item(), rel=1e-5)
    t_params = dict(twin.named_parameters())
    for name, grad in model.named_grads().items():
        assert_close(grad, t_params[name].grad.numpy(), what=name)


def test_llama_cached_generation_equals_recompute_and_folders_round_trip(tmp_path):
    from pyllm.generate import generate

    model = Model(ModelConfig(**LLAMA), seed=4)
    model.params[...] += np.random.default_rng(1).standard_normal(model.params.size).astype(np.float32) * 0.05
    prompts = [[1, 2, 3, 4, 5, 6], [7], [8, 9, 10]]
    cached = model.generate(prompts, 7, temperature=0)
    assert [c.tolist() for c in cached] == [c.tolist() for c in generate(model, prompts, 7, temperature=0,
                                                                          use_cache=False)]
    model.save_pretrained(tmp_path)
    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path)
    theirs.eval()
    ids, _ = batch(model.config, 1, 12)
    with torch.no_grad():
        assert_close(model(ids), theirs(torch.from_numpy(ids)).logits.numpy(), what="transformers reads our llama")
    theirs.save_pretrained(tmp_path / "back")
    again = Model.from_pretrained(tmp_path / "back")
    assert again.config.arch == "llama" and again.config.n_kv_head == 2
    assert_close(again(ids), model(ids), what="our reading of a transformers llama folder")


def test_config_refuses_inconsistent_heads():
    with pytest.raises(ValueError, match="n_kv_head"):
        ModelConfig(**SMALL, n_kv_head=1)
    with pytest.raises(ValueError, match="even head size"):
        ModelConfig(arch="llama", n_head=2, n_embd=6)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_safetensors_load_as_their_float32_values(tmp_path, dtype):
    from safetensors.torch import save_file

    from pyllm.io.hf import config_to_hf

    model = Model(ModelConfig(**SMALL), seed=4)
    half = {name: torch.from_numpy(np.array(value)).to(getattr(torch, dtype)) for name, value in model.state_dict().items()}
    save_file(half, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(model.config)))
    loaded = Model.from_pretrained(tmp_path)
    for name, value in half.items():
        np.testing.assert_array_equal(loaded.p[name], value.to(torch.float32).numpy(), err_msg=name)


def test_bytes_per_token_counts_what_a_decode_step_reads():
    from pyllm.model import QuantizedWeight

    cfg = ModelConfig(**SMALL)
    model = Model(cfg, seed=0)
    C, T, kv = cfg.n_embd, 10, 2 * cfg.n_layer * cfg.n_embd * 4   # float32 keys and values per position
    # Every float parameter once, but only one row of the position table (the tied token table is
    # the head: read whole).
    expected = model.params.nbytes - (cfg.block_size - 1) * C * 4 + kv * T
    assert model.bytes_per_token(T) == expected
    llama = Model(ModelConfig(arch="llama", vocab_size=64, block_size=16, n_layer=1, n_head=2, n_kv_head=1,
                              n_embd=64, intermediate_size=96, tie_word_embeddings=False), seed=0)
    blocks = np.zeros((64, 2 * 34), np.uint8)    # the token table in Q8_0: one row of it is read
    quantized = Model(llama.config, seed=None, quantized={"model.embed_tokens.weight": QuantizedWeight(blocks, 8, (64, 64))})
    assert quantized.kv_dtype == np.float16
    floats = quantized.params.nbytes
    assert quantized.bytes_per_token(3) == floats + 2 * 34 + 2 * 1 * 1 * 32 * 3 * 2
