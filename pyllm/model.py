"""pyllm.Model: the transformer (pyllm.models.Transformer) with its files and its generation:
`Model.from_pretrained`, `save_pretrained`, `save_gguf`, `generate`.

The model layer below knows no files and no sampling; this is where they meet it. Loading reads a
file once (pyllm.io returns the config and tensors) and fills the model one tensor at a time.
Not the tokenizer or the chat template (pyllm.llm.LLM puts the three together).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional


from pyllm.generate import generate
from pyllm.hub import DEFAULT_MODEL, resolve_model
from pyllm.io import gguf_model, gguf_writer, hf
from pyllm.io.gguf import GGUFFile
from pyllm.io.tensors import ModelWeights
from pyllm.io.tokenizer_files import ChatFormat, end_of_text, write_hf_chat
from pyllm.models import ARCHITECTURES, KVCache, ModelConfig, ParamSpec, QuantizedWeight, Transformer, parameter_specs
from pyllm.progress import bar as progress_bar

# Re-exported for the code that imported them from here before the model layer had its own package.
__all__ = ["ARCHITECTURES", "DEFAULT_MODEL", "KVCache", "Model", "ModelConfig", "ParamSpec", "QuantizedWeight",
           "parameter_specs", "resolve_model"]


class Model(Transformer):
    """A GPT-style decoder-only transformer (GPT-2, Llama, Qwen2, Qwen3) with hand-written backward passes
    over the C++ kernels, its Hugging Face / GGUF files, and generation.

    Parameters live in `self.params`, gradients in `self.grads` (flat float32 buffers); `self.p` and
    `self.g` map Hugging Face names to views into them.
    """

    def generate(self, ids, max_new_tokens: int, temperature: float = 1.0, top_k: Optional[int] = None,
                 top_p: Optional[float] = None, seed: Optional[int] = None, **options):
        """The prompt ids followed by up to max_new_tokens sampled ones (greedy when temperature is 0),
        with a KV cache; a batch of prompts (of any lengths) gives a list. See pyllm.generate.generate
        for the options (min_p, penalties, stop_tokens)."""
        return generate(self, ids, max_new_tokens, temperature, top_k, top_p, seed, **options)

    def save_pretrained(self, directory, tokenizer=None) -> None:
        """A Hugging Face folder: config.json, model.safetensors, and with a tokenizer its
        tokenizer.json and tokenizer_config.json (the end-of-text token also in config.json), so
        that transformers' AutoTokenizer and pipelines open the folder whole."""
        eos = end_of_text(tokenizer.special_tokens) if tokenizer is not None else None
        token_ids = {"eos_token_id": tokenizer.special_tokens[eos]} if eos is not None else {}
        hf.write_folder(directory, self.config, self.state_dict(), token_ids)
        if tokenizer is not None:
            tokenizer.save(Path(directory) / hf.TOKENIZER, format="hf")
            write_hf_chat(directory, ChatFormat(None, eos))

    def save_gguf(self, path, type: str = "f16", tokenizer=None, chat_template: Optional[str] = None,
                  eos_id: Optional[int] = None, bos_id: Optional[int] = None, progress: bool = True) -> None:
        """A GGUF file llama.cpp loads: matrices as `type` (f32, f16, q8_0, q4_0, q4_1, q4_k; quantized
        weights of a loaded GGUF are dequantized and quantized again), with the tokenizer (a
        pyllm.Tokenizer; llama.cpp needs one) and the chat template in the metadata."""
        bar = progress_bar(total=0, unit="tensor", desc=f"writing {Path(path).name}", enabled=progress, leave=False)

        def step(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)
        try:
            gguf_writer.write_gguf(path, self.config, self.state_dict(), type,
                                   tokenizer.data() if tokenizer is not None else None, chat_template, eos_id, bos_id,
                                   progress=step)
        finally:
            bar.close()

    @classmethod
    def from_weights(cls, weights: ModelWeights, where: str = "") -> "Model":
        """A model filled from what a file reader returned (tensors read one at a time); errors name
        `where` (the file)."""
        try:
            model = cls(weights.config, seed=None, quantized=weights.quantized)
            model.load_state_dict(weights.tensors)
        except ValueError as exc:
            message = str(exc)
            raise ValueError(message if not where or message.startswith(where) else f"{where}: {message}") from None
        return model

    @classmethod
    def from_gguf(cls, source, dequantize: bool = False) -> "Model":
        """A model from a GGUF file: a path, or a GGUFFile the caller keeps (and closes). Quantized
        matrices stay quantized (views of the mapped file, inference only) unless dequantize=True."""
        if isinstance(source, GGUFFile):
            return cls.from_weights(gguf_model.read_weights(source, dequantize), str(source.path))
        f = GGUFFile(source)
        model = None
        try:
            model = cls.from_gguf(f, dequantize)
            return model
        finally:
            release(f, model)

    @classmethod
    def from_pretrained(cls, source) -> "Model":
        """A model from a Hugging Face folder (GPT-2 or Llama, as save_pretrained or transformers wrote
        it), a .gguf file, or the alias "smollm2-135m-instruct" (the default model)."""
        path = resolve_model(source)
        if path.suffix == ".gguf":
            return cls.from_gguf(path)
        return cls.from_weights(hf.read_folder(path), str(path))


def release(f: GGUFFile, model: Optional[Model]) -> None:
    """Closes a GGUF file unless `model` keeps quantized weights that are views of its mapping (the
    packed ones are copies)."""
    if model is not None and any(f.maps(q.data) for q in model.quantized.values()):
        return
    try:
        f.close()
    except BufferError:   # a view of the mapping is still referenced (by a traceback): let GC close it
        pass
