"""pyllm: a readable large-language-model stack with C++ kernels and numpy at the boundary.

Not a PyTorch wrapper: nothing here imports torch at run time.
"""

import importlib

__version__ = "0.1.0"
__all__ = ["Tokenizer", "Model", "ModelConfig", "AdamW", "LLM", "kernels", "reference", "get_num_threads", "set_num_threads", "__version__"]


def __getattr__(name: str):
    # Imported on first use, so `pyllm.reference` (pure numpy) works without the built extension.
    if name in ("kernels", "reference", "bench", "tokenizer", "data", "hub", "model", "models", "optim", "train",
                "generate", "llm", "lora", "finetune", "io", "pretokenize"):
        return importlib.import_module(f"pyllm.{name}")
    if name == "Tokenizer":
        return importlib.import_module("pyllm.tokenizer").Tokenizer
    if name == "Model":
        return importlib.import_module("pyllm.model").Model
    if name == "ModelConfig":
        return importlib.import_module("pyllm.models").ModelConfig
    if name == "LLM":
        return importlib.import_module("pyllm.llm").LLM
    if name == "AdamW":
        return importlib.import_module("pyllm.optim").AdamW
    if name in ("get_num_threads", "set_num_threads"):
        return getattr(importlib.import_module("pyllm.kernels"), name)
    raise AttributeError(f"module 'pyllm' has no attribute {name!r}")
