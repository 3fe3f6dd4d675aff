"""Speculative decoding: drafts proposed on the host, verified in the step (`engine.py`)."""
