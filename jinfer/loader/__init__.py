"""Loading: weights from GGUF files, HF directories and orbax checkpoints; the named models."""
