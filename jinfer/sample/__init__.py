"""Sampling: the batched on-device sampler and the batch it reads."""
