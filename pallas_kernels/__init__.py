"""Pallas kernels, one folder per kind of operation; they know nothing of the engine.

attention/   paged attention: ragged and decode kernels for GPU and TPU, with references
"""
