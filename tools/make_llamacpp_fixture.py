"""Records llama.cpp's outputs on SmolLM2-135M-Instruct.Q4_1.gguf into tests/fixtures/, the
reference that tests/test_gguf_model.py compares pyllm against (without llama.cpp installed).

Run (llama-cpp-python compiles llama.cpp; a few minutes):
    pip install llama-cpp-python
    python tools/make_llamacpp_fixture.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n",
]
OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "smollm2_llamacpp.json"


def main() -> int:
    import llama_cpp

    from pyllm.hub import smollm2_gguf
    from pyllm.tokenizer import Tokenizer

    path = smollm2_gguf()
    tok = Tokenizer.from_gguf(path)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=2, verbose=False)

    def last_logits():   # the last position's logits (llm.scores is only filled with logits_all)
        ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).astype(np.float64)

    cases = []
    for prompt in PROMPTS:
        ids = tok.encode(prompt, allowed_special="all")
        assert ids == llm.tokenize(prompt.encode(), add_bos=False, special=True), "tokenizers disagree"
        llm.reset()
        llm.eval(ids)
        logits = last_logits()
        top5 = np.argsort(-logits)[:5].tolist()
        greedy = []
        for _ in range(32):
            token = int(np.argmax(last_logits()))
            greedy.append(token)
            llm.eval([token])
        cases.append({"prompt": prompt, "ids": ids, "top5": top5, "top5_logits": logits[top5].tolist(),
                      "greedy32": greedy})
    doc = {"model": path.name, "llama_cpp_python": llama_cpp.__version__,
           "command": "python tools/make_llamacpp_fixture.py", "cases": cases}
    OUT.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
