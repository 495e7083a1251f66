"""The base model and what sits on it: loading (GGUF, hub, local), LoRA factors, named task adapters, input
subspaces and merges of task vectors."""
