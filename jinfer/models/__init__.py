"""Models: parameters with their logical axes (`params.py`) and the forward pass as free functions."""
