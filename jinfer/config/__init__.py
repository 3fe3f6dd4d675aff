"""Configuration: the model's (`model.py`), every engine option once (`engine.py`), their flags
(`cli.py`), and the KV cache's geometry (`cache.py`)."""
