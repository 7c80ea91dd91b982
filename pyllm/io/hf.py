"""Hugging Face model folders: config.json + model.safetensors (or shards named by
model.safetensors.index.json), GPT-2, Llama, Mistral, Qwen2, Qwen3 and Gemma 3 (text), and
safetensors files in general.

What write_folder writes, `transformers` loads as GPT2LMHeadModel / LlamaForCausalLM /
MistralForCausalLM / Qwen2ForCausalLM / Qwen3ForCausalLM / Gemma3ForCausalLM with the same logits; what `transformers` writes (or the hub's
GPT-2 files), read_folder reads. Readers return data (pyllm.io.tensors.ModelWeights) and never
build a model; the tokenizer's files are tokenizer_files.py's.
"""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path
from typing import Optional

import numpy as np
from safetensors import SafetensorError, safe_open

from pyllm.io.atomic import atomic_path, read_json_object, write_text
from pyllm.io.tensors import LazyTensors, ModelWeights, check_sizes_against_file
from pyllm.models import ModelConfig, hf_norm_offsets

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"   # sharded weights: {"weight_map": {tensor: shard file}}
TOKENIZER = "tokenizer.json"
LAYER_OF = re.compile(r"(?:model\.layers|transformer\.h)\.(\d+)\.")   # a tensor's layer, in pyllm's names
# Buffers and duplicates that GPT-2 checkpoints may carry besides the parameters.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")


# The Llama-shaped families: pyllm arch -> (transformers class, model_type).
_LLAMA_LIKE = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
               "mistral": "MistralForCausalLM"}   # mistral: pyllm's llama with a sliding window

_MISSING = object()


def _get(doc: dict, key: str, where: str, default):
    value = doc.get(key, default)
    if value is _MISSING:
        raise ValueError(f"{where}: missing key {key!r}")
    return value


def _int(doc: dict, key: str, where: str, default=_MISSING) -> Optional[int]:
    """doc[key] as an int (a JSON integer, or a float with no fraction), None where it is null."""
    value = _get(doc, key, where, default)
    if value is None:
        return None
    if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
        raise ValueError(f"{where}: {key} must be an integer, got {value!r}")
    return int(value)


def _num(doc: dict, key: str, where: str, default=_MISSING) -> Optional[float]:
    """doc[key] as a finite float, None where it is null."""
    value = _get(doc, key, where, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where}: {key} must be a finite number, got {value!r}")
    return float(value)


def _flag(doc: dict, key: str, where: str, default: bool) -> bool:
    """doc[key] as a JSON true or false (a string "false" is refused, not read as true)."""
    value = _get(doc, key, where, default)
    if not isinstance(value, bool):
        raise ValueError(f"{where}: {key} must be true or false, got {value!r}")
    return value


def config_to_hf(cfg: ModelConfig) -> dict:
    if cfg.arch == "gemma3":
        return _gemma3_config_to_hf(cfg)
    if cfg.arch in _LLAMA_LIKE:
        model_type = "mistral" if cfg.arch == "llama" and cfg.sliding_window else cfg.arch
        if cfg.sliding_window and model_type != "mistral":
            raise ValueError(f"a {cfg.arch} model with a sliding window has no Hugging Face config")
        doc = {
            "architectures": [_LLAMA_LIKE[model_type]], "model_type": model_type,
            "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.block_size,
            "hidden_size": cfg.n_embd, "intermediate_size": cfg.intermediate_size,
            "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
            "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_size, "hidden_act": "silu",
            "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
            "tie_word_embeddings": cfg.tie_word_embeddings, "torch_dtype": "float32",
        }
        if cfg.rope_scaling is not None:
            if cfg.rope_scaling.get("rope_type") != "llama3":
                raise ValueError("a rope scaled by a GGUF's frequency factors has no Hugging Face config; "
                                 "only llama3 rope scaling does")
            doc["rope_scaling"] = dict(cfg.rope_scaling)
        if model_type == "mistral":
            doc.update(sliding_window=cfg.sliding_window)
        elif cfg.arch == "llama":
            doc.update(attention_bias=False, mlp_bias=False)
        elif cfg.arch == "qwen3":
            doc.update(attention_bias=False, use_sliding_window=False)
        else:
            doc.update(use_sliding_window=False)
        return doc
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": cfg.vocab_size, "n_positions": cfg.block_size, "n_ctx": cfg.block_size,
        "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
        "n_inner": cfg.intermediate_size, "activation_function": "gelu_new",
        "layer_norm_epsilon": cfg.norm_eps, "tie_word_embeddings": cfg.tie_word_embeddings,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        "scale_attn_weights": True, "torch_dtype": "float32",
    }


def _gemma3_config_to_hf(cfg: ModelConfig) -> dict:
    """Gemma3ForCausalLM's config (text only), in the keys transformers 4.5x and 5 both read."""
    doc = {
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
        "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.block_size,
        "hidden_size": cfg.n_embd, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_size,
        "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "rope_local_base_freq": cfg.rope_local_theta or cfg.rope_theta,
        "sliding_window": cfg.sliding_window or cfg.block_size,
        "layer_types": [("sliding_attention" if cfg.layer_window(i) else "full_attention") for i in range(cfg.n_layer)],
        "query_pre_attn_scalar": _number(cfg.query_pre_attn_scalar or cfg.head_size),
        "final_logit_softcapping": cfg.final_logit_softcapping, "attn_logit_softcapping": None,
        "attention_bias": False, "tie_word_embeddings": cfg.tie_word_embeddings, "torch_dtype": "float32",
    }
    if cfg.rope_scaling is not None:
        if cfg.rope_scaling.get("rope_type") not in ("linear", "llama3"):
            raise ValueError("a rope scaled by a GGUF's frequency factors has no Hugging Face config")
        doc["rope_scaling"] = dict(cfg.rope_scaling)
    return doc


def _number(x: float):
    """x as an int when it is one (transformers' Gemma config types the query scalar int)."""
    return int(x) if float(x).is_integer() else float(x)


def _gemma3_config_from_hf(doc: dict, where: str) -> ModelConfig:
    """Gemma 3's text config: transformers 4.5x's keys (rope_theta, rope_local_base_freq,
    rope_scaling, sliding_window_pattern) or 5's (rope_parameters per layer type, layer_types)."""
    if doc.get("hidden_activation", doc.get("hidden_act", "gelu_pytorch_tanh")) not in ("gelu_pytorch_tanh",
                                                                                         "gelu_new"):
        raise ValueError(f"{where}: hidden_activation {doc.get('hidden_activation')!r} is not supported "
                         f"(gelu_pytorch_tanh is)")
    for flag in ("attn_logit_softcapping", "use_bidirectional_attention", "attention_bias"):
        if doc.get(flag):
            raise ValueError(f"{where}: {flag}={doc[flag]!r} is not supported for gemma3")
    params = doc.get("rope_parameters") or {}
    full = params.get("full_attention") if isinstance(params.get("full_attention"), dict) else {}
    local = params.get("sliding_attention") if isinstance(params.get("sliding_attention"), dict) else {}
    scaling = full if full.get("rope_type", "default") != "default" else doc.get("rope_scaling")
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind not in ("linear", "llama3"):
            raise ValueError(f"{where}: rope type {kind!r} is not supported for gemma3 (linear and llama3 are)")
        scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
        scaling["rope_type"] = kind
    if local.get("rope_type", "default") != "default":
        raise ValueError(f"{where}: scaled rope on sliding layers is not supported")
    layer_types = doc.get("layer_types")
    try:
        n_layer = _int(doc, "num_hidden_layers", where)
        if layer_types is None:
            pattern = _int(doc, "sliding_window_pattern", where, doc.get("_sliding_window_pattern", 6))
            if pattern < 1:
                raise ValueError(f"{where}: sliding_window_pattern must be positive, got {pattern}")
            layer_types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n_layer)]
        window = _int(doc, "sliding_window", where, None)
        heads, hidden = _int(doc, "num_attention_heads", where), _int(doc, "hidden_size", where)
        head_dim = _int(doc, "head_dim", where, None)
        softcap = _num(doc, "final_logit_softcapping", where, None)
        return ModelConfig(arch="gemma3", vocab_size=_int(doc, "vocab_size", where),
                           block_size=_int(doc, "max_position_embeddings", where, 131072),
                           n_layer=n_layer, n_head=heads, n_embd=hidden,
                           n_kv_head=(_int(doc, "num_key_value_heads", where, None) or heads),
                           head_dim=head_dim if head_dim is not None else 256,
                           intermediate_size=_int(doc, "intermediate_size", where),
                           norm_eps=_num(doc, "rms_norm_eps", where, 1e-6),
                           rope_theta=float(full.get("rope_theta", doc.get("rope_theta", 1e6))),
                           rope_local_theta=float(local.get("rope_theta", doc.get("rope_local_base_freq", 1e4))),
                           rope_scaling=scaling, layer_types=list(layer_types),
                           sliding_window=window,
                           query_pre_attn_scalar=_num(doc, "query_pre_attn_scalar", where, 256),
                           final_logit_softcapping=softcap,
                           tie_word_embeddings=_flag(doc, "tie_word_embeddings", where, True))
    except KeyError as exc:
        raise ValueError(f"{where}: missing key {exc.args[0]!r}") from None
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}") from None


def config_from_hf(doc: dict, where: str = CONFIG) -> ModelConfig:
    """The ModelConfig of a config.json's contents; every malformed value a ValueError naming
    `where` and the key."""
    if not isinstance(doc, dict):
        raise ValueError(f"{where}: not a JSON object")
    try:
        return _config_from_hf(doc, where)
    except ValueError as exc:
        message = str(exc)
        raise ValueError(message if message.startswith(where) else f"{where}: {message}") from None
    except (TypeError, AttributeError) as exc:   # a value of the wrong JSON type where a dict or list goes
        raise ValueError(f"{where}: a value has the wrong type ({exc})") from None


def _config_from_hf(doc: dict, where: str) -> ModelConfig:
    model_type = doc.get("model_type")
    if model_type in ("gemma3_text", "gemma3"):
        if model_type == "gemma3" or doc.get("text_config"):
            raise ValueError(f"{where}: this is Gemma 3's multimodal model (Gemma3ForConditionalGeneration); "
                             f"pyllm runs the text models (gemma3_text, Gemma3ForCausalLM)")
        return _gemma3_config_from_hf(doc, where)
    if model_type in _LLAMA_LIKE:
        return _llama_config_from_hf(doc, where)
    if model_type != "gpt2":
        raise ValueError(f"{where}: model_type {model_type!r} is not supported "
                         f"(supported: gpt2, {', '.join(_LLAMA_LIKE)}, gemma3_text)")
    activation = doc.get("activation_function", "gelu_new")
    if activation not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"{where}: activation_function {activation!r} is not supported (gelu_new is)")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if doc.get(flag):
            raise ValueError(f"{where}: {flag}=true is not supported")
    try:
        return ModelConfig(vocab_size=_int(doc, "vocab_size", where), block_size=_int(doc, "n_positions", where),
                           n_layer=_int(doc, "n_layer", where), n_head=_int(doc, "n_head", where), n_embd=_int(doc, "n_embd", where),
                           intermediate_size=_int(doc, "n_inner", where, None) or None,
                           norm_eps=_num(doc, "layer_norm_epsilon", where, 1e-5),
                           tie_word_embeddings=_flag(doc, "tie_word_embeddings", where, True))
    except KeyError as exc:
        raise ValueError(f"{where}: missing key {exc.args[0]!r}") from None


def _llama_config_from_hf(doc: dict, where: str) -> ModelConfig:
    if doc.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{where}: hidden_act {doc.get('hidden_act')!r} is not supported (silu is)")
    # transformers 5 writes rope settings as rope_parameters; earlier ones as rope_theta/rope_scaling.
    rope = doc.get("rope_parameters") or doc.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", None, "llama3"):
        raise ValueError(f"{where}: rope type {rope_type!r} is not supported (plain and llama3 rotary "
                         f"embeddings are)")
    scaling = None
    if rope_type == "llama3":
        scaling = {"rope_type": "llama3", **{k: rope.get(k) for k in (
            "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}}
    theta = rope.get("rope_theta", doc.get("rope_theta", 10000.0))
    arch = doc["model_type"]
    window = None
    if arch == "mistral":   # Llama's block with an optional sliding window
        arch, window = "llama", _int(doc, "sliding_window", where, None)
    if doc.get("attention_bias") or doc.get("mlp_bias"):
        raise ValueError(f"{where}: attention/mlp biases are not supported for {arch}"
                         + (" (qwen2 has its q/k/v biases always)" if arch == "qwen2" else ""))
    if doc.get("use_sliding_window"):
        raise ValueError(f"{where}: use_sliding_window=true (Qwen's sliding window on some layers) is not "
                         f"supported yet")
    try:
        heads, hidden = _int(doc, "num_attention_heads", where), _int(doc, "hidden_size", where)
        return ModelConfig(arch=arch, vocab_size=_int(doc, "vocab_size", where),
                           head_dim=_int(doc, "head_dim", where, None), rope_scaling=scaling,
                           sliding_window=window,
                           block_size=_int(doc, "max_position_embeddings", where, 2048),
                           n_layer=_int(doc, "num_hidden_layers", where), n_head=heads, n_embd=hidden,
                           n_kv_head=(_int(doc, "num_key_value_heads", where, None) or heads),
                           intermediate_size=_int(doc, "intermediate_size", where),
                           norm_eps=_num(doc, "rms_norm_eps", where, 1e-6),
                           rope_theta=float(theta),
                           tie_word_embeddings=_flag(doc, "tie_word_embeddings", where, False))
    except KeyError as exc:
        raise ValueError(f"{where}: missing key {exc.args[0]!r}") from None


_SAFETENSORS_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.float64): "F64",
                       np.dtype(np.int64): "I64", np.dtype(np.int32): "I32", np.dtype(np.int16): "I16",
                       np.dtype(np.int8): "I8", np.dtype(np.uint8): "U8", np.dtype(np.uint16): "U16",
                       np.dtype(np.uint32): "U32", np.dtype(np.uint64): "U64", np.dtype(np.bool_): "BOOL"}


def write_safetensors(path, tensors) -> None:
    """A safetensors file (PyTorch's "pt" format tag, as transformers and peft expect), written
    atomically and streamed: the header (8-byte length, JSON, padded to 8 bytes), then each tensor's
    bytes in turn, so no second copy of the weights is ever held (safetensors' own numpy writer
    copies every tensor into one buffer first: a 540 MB model's save peaked 540 MB higher).
    `tensors` is a mapping name -> array; a lazy one is read one tensor at a time, twice."""
    names = list(tensors)
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        arr = np.asarray(tensors[name])
        if arr.dtype not in _SAFETENSORS_DTYPES:
            raise TypeError(f"{path}: {name} is {arr.dtype}, which safetensors does not store")
        header[name] = {"dtype": _SAFETENSORS_DTYPES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name in names:
            arr = np.ascontiguousarray(tensors[name])
            if arr.size:
                f.write(memoryview(arr).cast("B"))


def write_folder(directory, config: ModelConfig, state: dict[str, np.ndarray],
                 token_ids: Optional[dict] = None) -> None:
    """config.json (with token_ids such as {"eos_token_id": 0}) and model.safetensors: a folder
    transformers loads."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_safetensors(directory / WEIGHTS, to_hf_state(config, state))
    write_text(directory / CONFIG, json.dumps({**config_to_hf(config), **(token_ids or {})}, indent=2) + "\n")


def _normalise_name(name: str) -> str:
    """GPT-2 checkpoints name parameters with or without the `transformer.` prefix."""
    if name.startswith(("h.", "wte.", "wpe.", "ln_f.")):
        return "transformer." + name
    return name


def load_state(path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as float32 arrays (F32, F16 and BF16 accepted)."""
    names, read = _tensor_reader(Path(path))
    return {name: read(name) for name in names}


def _tensor_reader(path: Path):
    """(names, read(name) -> float32 array) for a safetensors file, one tensor per call (the file
    opened once, memory-mapped)."""
    try:
        handle = safe_open(str(path), framework="numpy")
        names = list(handle.keys())
    except SafetensorError as exc:
        raise ValueError(f"{path}: not a readable safetensors file ({exc})") from None
    except OSError as exc:
        raise ValueError(f"{path}: could not read ({exc})") from None
    header: dict = {}

    def read(name: str) -> np.ndarray:
        try:
            return np.asarray(handle.get_tensor(name), dtype=np.float32)
        except SafetensorError as exc:
            raise ValueError(f"{path}: tensor {name} is not readable ({exc})") from None
        except Exception as exc:   # bf16 and other dtypes numpy lacks land here, as various errors
            if "bf16" in str(exc).lower() or "bfloat16" in str(exc).lower():
                if not header:
                    header.update(_header(path))
                return _read_bf16(path, header, name)
            raise ValueError(f"{path}: tensor {name} could not be read ({exc})") from None

    return names, read


def _header(path: Path) -> dict:
    """A safetensors file's JSON header, and where its data starts (key "__start__")."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: truncated safetensors file")
        (header_len,) = struct.unpack("<Q", head)
        if 8 + header_len > path.stat().st_size:
            raise ValueError(f"{path}: header length {header_len} runs past the end of the file")
        header = json.loads(f.read(header_len))
    if not isinstance(header, dict):
        raise ValueError(f"{path}: corrupt safetensors header")
    header["__start__"] = 8 + header_len
    return header


def _read_bf16(path: Path, header: dict, name: str) -> np.ndarray:
    """One tensor of a safetensors file by its JSON header, BF16 widened to float32 by hand."""
    info = header.get(name)
    dtypes = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}
    if not isinstance(info, dict) or info.get("dtype") not in dtypes:
        raise ValueError(f"{path}: tensor {name} has an unsupported dtype")
    start, end = info["data_offsets"]
    shape = tuple(info["shape"])
    dtype = dtypes[info["dtype"]]
    size = path.stat().st_size - header["__start__"]
    if not 0 <= start <= end <= size or end - start != np.dtype(dtype).itemsize * int(np.prod(shape)):
        raise ValueError(f"{path}: tensor {name} has offsets {start}..{end} that do not fit its shape")
    with open(path, "rb") as f:
        f.seek(header["__start__"] + start)
        raw = np.frombuffer(f.read(end - start), dtype=dtype).reshape(shape)
    if info["dtype"] == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32)


def read_config(directory) -> ModelConfig:
    """The ModelConfig of a Hugging Face folder's config.json."""
    directory = Path(directory)
    if not (directory / CONFIG).is_file():
        raise FileNotFoundError(f"{directory}: no {CONFIG} (expected a Hugging Face model folder)")
    return config_from_hf(read_json_object(directory / CONFIG), str(directory / CONFIG))


def read_folder(source) -> ModelWeights:
    """The config and the tensors (read lazily, under pyllm's names) of a Hugging Face folder."""
    directory = Path(source)
    if directory.is_file():
        directory = directory.parent
    cfg = read_config(directory)
    readers, file_bytes = _weight_readers(directory)   # tensor name -> read(name)
    by_name = {_normalise_name(n): n for n in readers if not n.endswith(_IGNORED_SUFFIXES)}
    check_sizes_against_file(cfg, by_name, LAYER_OF, file_bytes, 2, str(directory))
    if cfg.tie_word_embeddings:
        by_name.pop("lm_head.weight", None)
    offsets = hf_norm_offsets(cfg)

    def read(name: str) -> np.ndarray:
        values = readers[by_name[name]](by_name[name])
        return values + np.float32(offsets[name]) if name in offsets else values

    return ModelWeights(cfg, LazyTensors(by_name, read))


def to_hf_state(cfg: ModelConfig, state: dict) -> dict:
    """pyllm's tensors as Hugging Face's files hold them (Gemma's norms less their offset of 1)."""
    offsets = hf_norm_offsets(cfg)
    return {name: (np.asarray(v) - np.float32(offsets[name])) if name in offsets else v for name, v in state.items()}


def _weight_readers(directory: Path) -> tuple[dict, int]:
    """(tensor name -> its file's reader, the files' bytes), for model.safetensors or the shards its
    index names."""
    weights, index = directory / WEIGHTS, directory / INDEX
    if weights.is_file():
        names, read = _tensor_reader(weights)
        return {name: read for name in names}, weights.stat().st_size
    if not index.is_file():
        raise FileNotFoundError(f"{directory}: no {WEIGHTS} and no {INDEX}")
    weight_map = read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index}: no weight_map of tensor names to shard files")
    shards: dict = {}
    out = {}
    for name, file in weight_map.items():
        if not isinstance(file, str) or Path(file).name != file or not file.endswith(".safetensors"):
            raise ValueError(f"{index}: {name!r} names the shard {file!r}, not a .safetensors file in the folder")
        if file not in shards:
            if not (directory / file).is_file():
                raise FileNotFoundError(f"{index}: the shard {file} is missing")
            names, read = _tensor_reader(directory / file)
            shards[file] = (set(names), read)
        shard_names, read = shards[file]
        if name not in shard_names:
            raise ValueError(f"{index}: {name!r} is not in {file}")
        out[name] = read
    return out, sum((directory / file).stat().st_size for file in shards)
