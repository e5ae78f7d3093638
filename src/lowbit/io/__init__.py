"""Reading and writing quantized models: ``native`` (lowbit's own folder), ``serving``
(compressed-tensors / GPTQ / AWQ checkpoints for vLLM, SGLang and transformers) and ``gguf``
(GGUF files and importance matrices for llama.cpp)."""
