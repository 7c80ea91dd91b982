"""File formats pyllm reads and writes: GGUF (llama.cpp), and more as the model lands."""
