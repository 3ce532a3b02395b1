"""Hugging Face and llama.cpp interchange: the only code that knows checkpoint key names.

    safetensors_io   (sharded) safetensors via the `safetensors` package: lazy, checked reads, atomic writes
    convert          name maps (flax path, HF key, reversible transform) -> params, all errors at once
    checkpoint       load_pretrained / save_pretrained, dispatching on config.json's model_type
    llama, gemma,    decoder family modules (config + key map); vit, swin: vision families
    gemma2, gemma3
    gguf_file, gguf  GGUF parsing and the llama GGUF importer (dequantised to float32)
    gguf_gemma       Gemma (1/2/3) GGUF tensor names, config reader and norm-weight transform
"""
