"""pyllm.Model: the transformer (pyllm.models.Transformer) with its files and its generation:
`Model.from_pretrained`, `save_pretrained`, `generate`.

The model layer below knows no files and no sampling; this is where they meet it. Loading reads a
file once (pyllm.io returns the config and tensors) and fills the model one tensor at a time.
Not the tokenizer or the chat template (pyllm.llm.LLM puts the three together).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from pyllm.generate import generate
from pyllm.hub import DEFAULT_MODEL, resolve_model
from pyllm.io import gguf_model, hf
from pyllm.io.gguf import GGUFFile
from pyllm.io.tensors import ModelWeights
from pyllm.models import KVCache, ModelConfig, QuantizedWeight, Transformer

__all__ = ["DEFAULT_MODEL", "KVCache", "Model", "ModelConfig", "QuantizedWeight", "resolve_model"]


class Model(Transformer):
    """A GPT-style decoder-only transformer (GPT-2 or Llama family) with hand-written backward passes
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
        """A Hugging Face folder: config.json, model.safetensors (and tokenizer.json, if given)."""
        hf.write_folder(directory, self.config, self.state_dict())
        if tokenizer is not None:
            tokenizer.save(Path(directory) / hf.TOKENIZER, format="hf")

    @classmethod
    def from_weights(cls, weights: ModelWeights, where: str = "") -> "Model":
        """A model filled from what a file reader returned (tensors read one at a time)."""
        model = cls(weights.config, seed=None, quantized=weights.quantized)
        try:
            model.load_state_dict(weights.tensors)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}" if where else str(exc)) from None
        return model

    @classmethod
    def from_gguf(cls, source, dequantize: bool = False) -> "Model":
        """A model from a GGUF file (a path or an open GGUFFile); quantized matrices stay quantized
        (views of the mapped file, inference only) unless dequantize=True."""
        f = source if isinstance(source, GGUFFile) else GGUFFile(source)
        weights = None
        try:
            weights = gguf_model.read_weights(f, dequantize)
            return cls.from_weights(weights, str(f.path))
        finally:
            if weights is None or not weights.quantized:
                _close(f)   # otherwise the quantized weights are views of the file's mapping: it stays open

    @classmethod
    def from_pretrained(cls, source) -> "Model":
        """A model from a Hugging Face folder (GPT-2 or Llama, as save_pretrained or transformers wrote
        it), a .gguf file, or the alias "smollm2-135m-instruct" (the default model)."""
        path = resolve_model(source)
        if path.suffix == ".gguf":
            return cls.from_gguf(path)
        return cls.from_weights(hf.read_folder(path), str(path))


def _close(f: GGUFFile) -> None:
    try:
        f.close()
    except BufferError:   # a view of the mapping is still referenced (by a traceback): let GC close it
        pass
