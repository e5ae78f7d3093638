"""GGUF files for llama.cpp: ``export`` (the writer, ``export_gguf``), ``presets`` (file
types and llama.cpp's per-tensor type rules), ``vocab`` (tokenizer metadata), ``imatrix``
(importance matrices: collection and files), ``check`` (a bounded structural check of a GGUF
file before anything else reads it). Import the submodules; this package imports nothing, so
``lowbit.io.gguf.check`` stays light."""
