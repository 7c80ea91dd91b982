"""Fuzz targets for every loader and entry point that takes outside input, and the mutation engine
that drives them: seed inputs made from real files pyllm writes (a GGUF model, a Hugging Face folder,
tokenizer files, an adapter, a checkpoint, JSONL data), mutated byte-wise and, for JSON, structurally.

A target passes an input when it returns or raises one of the documented exception types (ValueError
and its subclasses, TypeError, OSError) within a second; anything else (another exception, a crash, a
hang, MemoryError under the fuzzer's memory bound) is a finding. Not a test by itself:
tests/fuzz/test_fuzz.py runs a short, seeded pass of each; tools/fuzz.py the long runs.
"""

from __future__ import annotations

import copy
import json
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

REGRESSIONS = Path(__file__).resolve().parent / "regressions"   # <target>/<input>: once findings, kept
EXPECTED = (ValueError, TypeError, OSError)   # what bad input may raise (UnicodeError, JSONDecodeError,
                                              # DataError, FileNotFoundError are subclasses)
INTERESTING = [0, 1, -1, 2, 7, 31, 32, 255, 256, 65535, 2 ** 31 - 1, -2 ** 31, 2 ** 32 - 1, 2 ** 32, 2 ** 53,
               2 ** 63 - 1, -2 ** 63, 2 ** 64 - 1, 10 ** 12]


# ----------------------------------------------------------------------------- mutations

def mutate_bytes(data: bytes, rng: random.Random, others: list[bytes]) -> bytes:
    """One to four byte-level edits: flips, interesting bytes and integers (4 or 8 bytes, little
    endian, where GGUF and safetensors keep counts and offsets), truncation, duplication, deletion,
    splicing with another seed."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(8)
        if not buf:
            buf += bytes([rng.randrange(256)])
            continue
        at = rng.randrange(len(buf))
        if op == 0:
            buf[at] ^= 1 << rng.randrange(8)
        elif op == 1:
            buf[at] = rng.choice((0, 0xFF, 0x7F, 0x80, 0x20, 0x22, 0x5C))
        elif op in (2, 3):
            width = 4 if op == 2 else 8
            value = rng.choice(INTERESTING) % (1 << (8 * width))
            buf[at:at + width] = value.to_bytes(width, "little")
        elif op == 4:
            del buf[rng.randrange(len(buf) + 1):]
        elif op == 5:
            end = min(len(buf), at + rng.randint(1, 64))
            buf[at:at] = buf[at:end] * rng.randint(1, 4)
        elif op == 6:
            del buf[at:at + rng.randint(1, 32)]
        elif others:
            other = rng.choice(others)
            if other:
                start = rng.randrange(len(other))
                buf[at:at] = other[start:start + rng.randint(1, 256)]
    return bytes(buf)


def _leaves(doc, path=()):
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _leaves(v, path + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc[:64]):
            yield from _leaves(v, path + (i,))
    yield path


def _set(doc, path, value):
    if not path:
        return value
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return doc


JSON_VALUES = [None, True, False, 0, -1, 1.5, 1e308, 2 ** 63, 10 ** 30, "", "false",
               "x" * 300, [], {}, [1, 2], {"a": 1}, "<|endoftext|>", "{{ x }}", -2 ** 63, 0.0]


def mutate_json(data: bytes, rng: random.Random, others: list[bytes]) -> bytes:
    """A JSON document with one to three values replaced (by other types, huge or negative numbers,
    empty or long strings, containers), keys dropped or lists cut; now and then raw byte edits."""
    if rng.random() < 0.25:
        return mutate_bytes(data, rng, others)
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return mutate_bytes(data, rng, others)
    for _ in range(rng.randint(1, 3)):
        paths = list(_leaves(doc))
        path = rng.choice(paths)
        op = rng.randrange(4)
        try:
            if op == 0 or not path:
                doc = _set(doc, path, copy.deepcopy(rng.choice(JSON_VALUES)))
            elif op == 1:
                parent = doc
                for key in path[:-1]:
                    parent = parent[key]
                del parent[path[-1]]
            elif op == 2:
                parent = doc
                for key in path[:-1]:
                    parent = parent[key]
                value = parent[path[-1]]
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    parent[path[-1]] = rng.choice(INTERESTING)
                elif isinstance(value, str):
                    parent[path[-1]] = value * rng.randint(0, 3)
                elif isinstance(value, list):
                    parent[path[-1]] = value[:rng.randrange(len(value) + 1)] + value[:rng.randint(0, 2)]
            else:
                parent = doc
                for key in path[:-1]:
                    parent = parent[key]
                if isinstance(parent, dict):
                    parent[rng.choice(["vocab_size", "n_layer", "id", "type", "shape", "extra"])] = \
                        copy.deepcopy(rng.choice(JSON_VALUES))   # a copy: a shared one could end up inside itself
        except (KeyError, IndexError, TypeError):
            pass
    return json.dumps(doc).encode()


# ----------------------------------------------------------------------------- the seed world

@dataclass
class World:
    """Real files to mutate (made once per process) and the objects targets run against."""
    root: Path
    llm: object
    tok: object
    seeds: dict = field(default_factory=dict)   # target name -> list of seed bytes


def make_world() -> World:
    from pyllm.llm import LLM
    from pyllm.lora import LoRA, LoRAConfig
    from pyllm.model import Model, ModelConfig
    from pyllm.tokenizer import Tokenizer

    root = Path(tempfile.mkdtemp(prefix="pyllm-fuzz-"))
    text = "the quick brown fox jumps over the lazy dog. Ünïcødé 数字 123 " * 20
    tok = Tokenizer.train(text, 300, pattern="gpt2", special_tokens=["<|endoftext|>", "<|im_start|>",
                                                                      "<|im_end|>"], progress=False)
    template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    model = Model(ModelConfig(arch="llama", vocab_size=tok.vocab_size, block_size=32, n_layer=2, n_head=2,
                              n_embd=32, intermediate_size=64), seed=0)
    llm = LLM(model, tok, template)
    llm.save(root / "model")
    llm.save_gguf(root / "model.q8_0.gguf", "q8_0", progress=False)
    llm.save_gguf(root / "model.f32.gguf", "f32", progress=False)
    tok.save(root / "tok.json")
    spm = _spm_gguf(root)
    lora = LoRA(model, LoRAConfig(rank=2, alpha=4))
    lora.save(root / "adapter")
    world = World(root, llm, tok)
    read = lambda p: (root / p).read_bytes()
    world.seeds = {
        "gguf": [read("model.q8_0.gguf"), read("model.f32.gguf")] + ([spm] if spm else []),
        "safetensors": [read("model/model.safetensors")],
        "config_json": [read("model/config.json")],
        "tokenizer_pyllm": [read("tok.json")],
        "tokenizer_hf": [read("model/tokenizer.json")],
        "adapter_config": [read("adapter/adapter_config.json")],
        "adapter_weights": [read("adapter/adapter_model.safetensors")],
        "chat_template": [template.encode(), b"{{ bos_token }}{% for m in messages %}{{ m['content'] | trim }}"
                          b"{% endfor %}{% if add_generation_prompt %}A:{% endif %}"],
        "jsonl_sft": [b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                      b'{"prompt": "2+2", "completion": "4"}\n'],
        "jsonl_dpo": [b'{"prompt": "2+2=", "chosen": "4", "rejected": "5"}\n'],
        "text": [text.encode(), "a<|im_end|>b<|endoftext|>".encode(), bytes(range(256))],
        "ids": [np.arange(0, 300, 7, dtype=np.int64).tobytes()],
        "sampler": [json.dumps({"temperature": 0.7, "top_k": 5, "top_p": 0.9, "min_p": 0.05,
                                "repetition_penalty": 1.1, "seed": 3}).encode()],
        "request": [json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                                "temperature": 0}).encode(),
                    json.dumps({"model": "m", "prompt": "the", "max_tokens": 2, "stop": ["x"],
                                "response_format": {"type": "json_object"}}).encode()],
    }
    write_checkpoint_seed(world)
    return world


def _spm_gguf(root: Path) -> bytes:
    """A GGUF file with a SentencePiece vocabulary (the model's, pieces with scores and <0xNN> bytes)."""
    from pyllm.llm import LLM
    from pyllm.model import Model, ModelConfig
    from pyllm.tokenizer import Tokenizer

    vocab = [b"<unk>", b"<s>", b"</s>"] + [bytes([b]) for b in range(256)] + [" the".encode(), " fox".encode(), b"ab"]
    scores = [None, None, None] + [0.0] * 256 + [-1.0, -2.0, -3.0]
    byte_ids = list(range(3, 259))
    tok = Tokenizer(vocab, [], pattern="spm", special_tokens={"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token_id=0,
                    scores=scores, byte_ids=byte_ids)
    model = Model(ModelConfig(arch="llama", vocab_size=len(vocab), block_size=16, n_layer=1, n_head=2, n_embd=32,
                              intermediate_size=64), seed=1)
    LLM(model, tok, None, [2], bos_token="<s>").save_gguf(root / "spm.gguf", "f32", progress=False)
    return (root / "spm.gguf").read_bytes()


def write_checkpoint_seed(world: World) -> None:
    from pyllm.train import TrainConfig, train
    out = world.root / "run"
    data = world.root / "corpus.txt"
    data.write_text("alpha beta gamma delta def return (x)\n" * 400)
    train(TrainConfig(out_dir=str(out), data=[str(data)], vocab_size=300, preset="tiny", n_embd=16, block_size=16,
                      batch_size=2, max_steps=2, eval_interval=2, eval_batches=1, checkpoint_interval=1,
                      warmup_steps=1, progress=False), say=lambda *_: None)
    world.seeds["checkpoint_state"] = [(out / "checkpoint" / "trainer_state.json").read_bytes()]


# ----------------------------------------------------------------------------- targets

def _scratch(world: World, name: str) -> Path:
    path = world.root / "scratch" / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def t_gguf(world, data):
    from pyllm.llm import LLM
    path = _scratch(world, "gguf") / "m.gguf"
    path.write_bytes(data)
    llm = LLM.load(path)
    llm.generate("the", 2, temperature=0)


def _folder(world, name, files: dict) -> Path:
    folder = _scratch(world, name)
    for p in (world.root / "model").iterdir():
        if p.name not in files:
            shutil.copyfile(p, folder / p.name)
    for fname, data in files.items():
        (folder / fname).write_bytes(data)
    return folder


def t_safetensors(world, data):
    from pyllm.model import Model
    Model.from_pretrained(_folder(world, "st", {"model.safetensors": data}))


def t_config_json(world, data):
    from pyllm.llm import LLM
    LLM.load(_folder(world, "cfg", {"config.json": data})).generate("the", 2, temperature=0)


def t_tokenizer_pyllm(world, data):
    from pyllm.tokenizer import Tokenizer
    path = _scratch(world, "tokp") / "tok.json"
    path.write_bytes(data)
    tok = Tokenizer.load(path)
    tok.decode(tok.encode("the quick brown fox <|endoftext|>", allowed_special="all"))


def t_tokenizer_hf(world, data):
    from pyllm.tokenizer import Tokenizer
    path = _scratch(world, "tokh") / "tokenizer.json"
    path.write_bytes(data)
    tok = Tokenizer.load(path)
    tok.decode(tok.encode("the quick brown fox", disallowed_special=()))


def _adapter(world, mutated: str, data: bytes) -> None:
    """An adapter folder whose file `mutated` is data (the other the good one), loaded onto the model."""
    from pyllm.lora import LoRA
    folder = _scratch(world, mutated)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if name != mutated:
            shutil.copyfile(world.root / "adapter" / name, folder / name)
    (folder / mutated).write_bytes(data)
    LoRA.load(world.llm.model, folder)
    world.llm.model.lora = None


def t_adapter_config(world, data):
    _adapter(world, "adapter_config.json", data)


def t_adapter_weights(world, data):
    _adapter(world, "adapter_model.safetensors", data)


def t_chat_template(world, data):
    from pyllm.llm import LLM
    llm = LLM(world.llm.model, world.tok, data.decode("utf-8", "replace"))
    llm.encode_chat([{"role": "system", "content": "s"}, {"role": "user", "content": "a<|im_end|>b"}])


def t_jsonl_sft(world, data):
    from pyllm import finetune
    path = _scratch(world, "sft") / "a.jsonl"
    path.write_bytes(data)
    finetune.read_examples(path, world.llm, skip_bad=bool(len(data) % 2), say=lambda *_: None)


def t_jsonl_dpo(world, data):
    from pyllm import finetune
    path = _scratch(world, "dpo") / "a.jsonl"
    path.write_bytes(data)
    finetune.read_pairs(path, world.llm, skip_bad=bool(len(data) % 2), say=lambda *_: None)


def t_text(world, data):
    from pyllm import pretokenize
    text = data.decode("utf-8", "surrogatepass" if len(data) % 3 == 0 else "replace")
    tok = world.tok
    for pattern in ("gpt2", "gpt4", "gpt2_digits"):   # the C++ split is the regex's, piece for piece
        try:
            fast = pretokenize.split(text, pattern)
        except ValueError:
            continue
        assert fast == pretokenize.split_reference(text, pattern), (pattern, text[:80])
    ids = tok.encode(text, disallowed_special=())
    assert isinstance(tok.decode(ids), str)
    tok.encode(text, allowed_special="all")


def t_ids(world, data):
    ids = np.frombuffer(data[: len(data) // 8 * 8], np.int64).tolist()
    world.tok.decode(ids)
    world.llm.model.generate(ids or [1], 1, temperature=0) if ids else None


def t_sampler(world, data):
    from pyllm import kernels
    try:
        args = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        args = {"temperature": len(data) / 7.0}
    if not isinstance(args, dict):
        raise TypeError("not an object")
    logits = np.linspace(-3, 3, 50, dtype=np.float32)
    kernels.sample(logits, **{k: v for k, v in args.items() if k in (
        "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
        "seed", "step", "history")})


def t_checkpoint_state(world, data):
    """A resumed run's state: read, checked and loaded as `pyllm train --resume` does (not trained on:
    a well-formed state may ask for any length of run)."""
    from pyllm.io.checkpoint import read_checkpoint, rng_from
    from pyllm.model import Model
    from pyllm.train import CHECKPOINT, MOMENTS, STATE, TrainConfig, read_resume_state, resumed_config
    src = world.root / "run"
    out = _scratch(world, "ckpt") / "run"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(src, out)
    (out / CHECKPOINT / STATE).write_bytes(data)
    checkpoint = read_checkpoint(out / CHECKPOINT, MOMENTS, STATE)
    cfg = resumed_config(checkpoint, TrainConfig(out_dir=str(out), resume=True, progress=False))
    state = read_resume_state(checkpoint, Model.from_pretrained(checkpoint.path).config)
    rng_from(state["rng"])
    cfg.model_config(cfg.vocab_size)
    try:   # two MPI ranks sharing the global batch (this seed's, of 1 micro-batch, they cannot)
        resumed_config(checkpoint, TrainConfig(out_dir=str(out), resume=True, progress=False), 2)
    except ValueError:
        pass


_APP = {}


def t_request(world, data):
    from starlette.testclient import TestClient
    from pyllm.serve.app import create_app
    if "client" not in _APP:
        client = _APP["client"] = TestClient(create_app(lambda: world.llm, "m")).__enter__()
        deadline = time.perf_counter() + 60
        while client.get("/health").status_code != 200:   # the model loads on a thread
            if time.perf_counter() > deadline:
                raise RuntimeError("the server did not become ready")
            time.sleep(0.05)
    client = _APP["client"]
    route = "/v1/chat/completions" if len(data) % 2 else "/v1/completions"
    response = client.post(route, content=data, headers={"content-type": "application/json"})
    assert response.status_code < 500, (response.status_code, response.text[:300])


TARGETS: dict[str, tuple[Callable, Callable]] = {   # name -> (target, mutator)
    "gguf": (t_gguf, mutate_bytes),
    "safetensors": (t_safetensors, mutate_bytes),
    "config_json": (t_config_json, mutate_json),
    "tokenizer_pyllm": (t_tokenizer_pyllm, mutate_json),
    "tokenizer_hf": (t_tokenizer_hf, mutate_json),
    "adapter_config": (t_adapter_config, mutate_json),
    "adapter_weights": (t_adapter_weights, mutate_bytes),
    "chat_template": (t_chat_template, mutate_bytes),
    "jsonl_sft": (t_jsonl_sft, mutate_bytes),
    "jsonl_dpo": (t_jsonl_dpo, mutate_bytes),
    "text": (t_text, mutate_bytes),
    "ids": (t_ids, mutate_bytes),
    "sampler": (t_sampler, mutate_json),
    "checkpoint_state": (t_checkpoint_state, mutate_json),
    "request": (t_request, mutate_json),
}


@dataclass
class Report:
    target: str
    inputs: int = 0
    expected_errors: int = 0
    slowest_s: float = 0.0
    largest_growth: int = 0                        # bytes: the most one input added at its peak
    findings: list = field(default_factory=list)   # (kind, detail, input bytes)



def memory_bound(size: int) -> int:
    """The most an input of `size` bytes may add to the process's resident peak: a fixed allowance for
    the interpreter, numpy and the thread pool's scratch, and 64 bytes per input byte (a float32 model
    from a quantized file is 8x its bytes; packed and cached copies a few times more)."""
    return (256 << 20) + 64 * size


class MemoryProbe:
    """How much an input adds to the resident set at its peak, per input: the kernel's high-water
    mark (VmHWM) is reset before each input (/proc/self/clear_refs) and read after it, against the
    resident size before. Memory the allocator kept resident from earlier inputs is reused without
    counting (the address-space cap of tools/fuzz.py bounds that). Linux only; `available` is False
    elsewhere (the check is then skipped)."""

    def __init__(self) -> None:
        try:
            self._reset()
            self._read("VmHWM")
            self.available = True
        except OSError:
            self.available = False

    @staticmethod
    def _read(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) << 10
        raise OSError(f"no {key} in /proc/self/status")

    @staticmethod
    def _reset() -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")   # resets the peak resident size to the current one

    def start(self) -> int:
        self._reset()
        return self._read("VmRSS")

    def growth(self, before: int) -> int:
        return max(0, self._read("VmHWM") - before)


def run(world: World, name: str, count: int, seed: int = 0, time_limit_s: float = 1.0,
        max_findings: int = 20, memory: MemoryProbe | None = None) -> Report:
    """`count` mutated inputs through one target (the seeds first); what each did."""
    _, mutator = TARGETS[name]
    rng = random.Random(seed)
    seeds = world.seeds[name]
    inputs = (seeds[i] if i < len(seeds) else mutator(rng.choice(seeds), rng, seeds) for i in range(count))
    return replay(world, name, inputs, time_limit_s, max_findings, memory)


def replay(world: World, name: str, inputs, time_limit_s: float = 1.0, max_findings: int = 20,
           memory: MemoryProbe | None = None) -> Report:
    """Each input through one target; what each did. With a MemoryProbe, an input whose resident
    peak exceeds the resident size before it by more than memory_bound(its size) is a finding."""
    target, _ = TARGETS[name]
    report = Report(name)
    measure = memory is not None and memory.available
    for data in inputs:
        before = memory.start() if measure else 0
        start = time.perf_counter()
        try:
            target(world, data)
        except EXPECTED:
            report.expected_errors += 1
        except MemoryError as exc:
            report.findings.append(("memory", repr(exc)[:300], data))
        except Exception as exc:   # noqa: BLE001 - every other exception is what the fuzzer looks for
            report.findings.append(("exception", f"{type(exc).__name__}: {str(exc)[:300]}", data))
        elapsed = time.perf_counter() - start
        report.slowest_s = max(report.slowest_s, elapsed)
        if elapsed > time_limit_s:
            report.findings.append(("slow", f"{elapsed:.2f} s", data))
        if measure:
            grew = memory.growth(before)
            report.largest_growth = max(report.largest_growth, grew)
            if grew > memory_bound(len(data)):
                report.findings.append(("memory", f"the resident set grew {grew >> 20} MiB for a {len(data)}-byte "
                                        f"input (bound {memory_bound(len(data)) >> 20} MiB)", data))
        report.inputs += 1
        if len(report.findings) >= max_findings:
            break
    return report
