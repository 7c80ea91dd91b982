"""Writes SmolLM2-135M-Instruct in another quantization with llama.cpp's own quantizer (through
llama-cpp-python), requantized from the Q4_1 file the default model ships as: Q4_K_M (its tensors
mix Q4_K, Q6_K, Q5_0 and Q8_0; llama.cpp falls back from the K-quants for rows that are not whole
256-value blocks, so loading it exercises every type pyllm reads) or Q8_0. The benchmarks and the
llama.cpp agreement tests compare the engines on these files. Not a quantizer of pyllm's own.

    python tools/quantize_smollm2.py Q4_K_M OUT.gguf      # needs llama-cpp-python installed
"""

from __future__ import annotations

import sys

FTYPES = {"Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0"}


def main(quant: str, out: str) -> None:
    if quant not in FTYPES:
        raise SystemExit(f"unknown quantization {quant!r} (known: {', '.join(FTYPES)})")
    import llama_cpp

    from pyllm.hub import smollm2_gguf

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, FTYPES[quant])
    params.allow_requantize = True
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(str(smollm2_gguf(quiet=True)).encode(), out.encode(), params)
    if rc != 0:
        raise SystemExit(f"llama_model_quantize failed ({rc})")
    print("wrote", out)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(sys.argv[1], sys.argv[2])
