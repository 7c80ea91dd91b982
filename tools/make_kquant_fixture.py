"""Writes tests/fixtures/kquants.npz: rows of random floats quantized to Q4_K, Q6_K, Q5_0 and Q5_1 (the
types llama.cpp's Q4_K_M files mix) by ggml itself
(the library llama-cpp-python ships), the block bytes, and ggml's own dequantization of them. The
tests check pyllm's readers of these formats against it without needing llama.cpp.

    python tools/make_kquant_fixture.py      # needs llama-cpp-python installed
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

TYPES = {"Q4_K": (12, 144), "Q6_K": (14, 210), "Q5_0": (6, 22), "Q5_1": (7, 24)}   # ggml id, bytes per block
ROWS, K = 6, 512


def main() -> None:
    import llama_cpp

    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((ROWS, K)).astype(np.float32)
    x[1] *= 40.0                       # large magnitudes
    x[2] = np.abs(x[2])                # one sign only (the minimum at 0)
    x[3, :256] = 0.0                   # an all-zero block
    x[4] = rng.uniform(-1, 1, K).astype(np.float32) * np.linspace(0.01, 8, K, dtype=np.float32)
    out = {"x": x}
    for name, (type_id, block_bytes) in TYPES.items():
        quantize = getattr(lib, f"quantize_row_{name.lower().replace('_k', '_K')}_ref")
        dequantize = getattr(lib, f"dequantize_row_{name.lower().replace('_k', '_K')}")
        raw = np.zeros((ROWS, K // (256 if name.endswith("K") else 32) * block_bytes), np.uint8)
        back = np.zeros((ROWS, K), np.float32)
        for r in range(ROWS):
            quantize(x[r].ctypes.data_as(ctypes.c_void_p), raw[r].ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(K))
            dequantize(raw[r].ctypes.data_as(ctypes.c_void_p), back[r].ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(K))
        out[name] = raw
        out[name + "_dequantized"] = back
        print(name, "max |x - dequantized| per row:", np.abs(back - x).max(1).round(3))
    path = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "kquants.npz"
    np.savez_compressed(path, **out)
    print("wrote", path)


if __name__ == "__main__":
    main()
