"""File formats pyllm reads and writes. Readers return data (configs, tensors, vocabularies, chat
formats) and never build a model or a tokenizer; writers take data.

    atomic.py           temporary file + fsync + rename; whole folders swapped in
    gguf.py             the GGUF container: header, metadata, tensor table, checked byte ranges
    gguf_model.py       a GGUF model's config and tensors (llama, gpt2)
    hf.py               Hugging Face folders: config.json, model.safetensors; safetensors files
    tensors.py          ModelWeights: what the model readers return
    tokenizer_files.py  pyllm's tokenizer JSON, tokenizer.json, tokenizer_config.json, GGUF vocabularies
    peft.py             LoRA adapter folders (peft's format)
    checkpoint.py       training checkpoints (train and finetune)
"""
