"""Configuration: the model (`model.py`), the engine options declared once (`engine.py`), their flags."""
