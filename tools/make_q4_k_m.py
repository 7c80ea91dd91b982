"""Writes a Q4_K_M GGUF of SmolLM2-135M-Instruct with llama.cpp's own quantizer (through
llama-cpp-python), requantized from the Q4_1 file the default model ships as. Its tensors mix
Q4_K, Q6_K, Q5_0 and Q8_0 (llama.cpp falls back from the K-quants for rows that are not whole
256-value blocks), so loading it exercises every type pyllm reads.

    python tools/make_q4_k_m.py OUT.gguf      # needs llama-cpp-python installed
"""

from __future__ import annotations

import sys


def main(out: str) -> None:
    import llama_cpp

    from pyllm.hub import smollm2_gguf

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.allow_requantize = True
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(str(smollm2_gguf(quiet=True)).encode(), out.encode(), params)
    if rc != 0:
        raise SystemExit(f"llama_model_quantize failed ({rc})")
    print("wrote", out)


if __name__ == "__main__":
    main(sys.argv[1])
