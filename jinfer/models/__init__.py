"""Models: parameters with their logical axes (`params.py`), the forward pass as free functions
(`decoder.py`) over the blocks of `layers.py`."""
