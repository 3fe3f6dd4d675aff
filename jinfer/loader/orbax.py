"""jinfer's orbax checkpoints: `jinfer_config.json` and `params/`, as
`scripts/convert_checkpoint.py` writes them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from jinfer.config.model import ModelConfig
from jinfer.loader.tensors import WeightsError
from jinfer.models.params import Params

CONFIG_FILE = "jinfer_config.json"  # marks an orbax checkpoint written by jinfer


PARAMS_DIR = "params"


# -------------------------------------------------------------------------------- orbax
def save_orbax(directory: str | os.PathLike, cfg: ModelConfig, params: Params) -> None:
    """Writes `jinfer_config.json` and `params/` (orbax) under `directory`."""
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(cfg.to_json())
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(directory / PARAMS_DIR, params, force=True)


def load_orbax(directory: str | os.PathLike) -> tuple[ModelConfig, Params]:
    import jax
    import orbax.checkpoint as ocp

    from jinfer.models.params import map_specs, param_specs

    directory = Path(directory).absolute()
    try:
        cfg = ModelConfig.from_json((directory / CONFIG_FILE).read_text())
    except (OSError, ValueError, TypeError) as e:
        raise WeightsError(f"cannot read {directory / CONFIG_FILE}: {e}") from e
    # Restore to host memory: placement (dtype, sharding) is `sharding.place_params`' job.
    host = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    target = map_specs(
        lambda s: jax.ShapeDtypeStruct(s.shape, np.float32, sharding=host), param_specs(cfg)
    )
    if not (directory / PARAMS_DIR).is_dir():
        raise WeightsError(f"orbax checkpoint {directory} has no {PARAMS_DIR}/ directory")
    try:
        with ocp.StandardCheckpointer() as ckpt:
            stored = ckpt.metadata(directory / PARAMS_DIR)
            # Check shapes first: a failed restore leaves orbax's pending reads to the GC.
            _check_orbax_shapes(getattr(stored, "item_metadata", stored), target, directory)
            params = ckpt.restore(directory / PARAMS_DIR, target)
    except WeightsError:
        raise
    except Exception as e:
        raise WeightsError(f"cannot restore orbax checkpoint {directory}: {e}") from e
    # Shapes were checked against the config before restoring (_check_orbax_shapes).
    return cfg, jax.tree_util.tree_map(np.asarray, params)


def _check_orbax_shapes(stored: Any, target: Any, directory: Path) -> None:
    """Every parameter the config implies is stored, with its shape, and nothing else is."""
    import jax

    def flat(tree: Any) -> dict[tuple, tuple[int, ...]]:
        def key(path: tuple) -> tuple:
            return tuple(getattr(k, "name", getattr(k, "key", getattr(k, "idx", k))) for k in path)

        leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
        return {key(path): tuple(leaf.shape) for path, leaf in leaves if leaf is not None}

    def show(k: tuple) -> str:
        return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in k)

    expected, have = flat(target), flat(getattr(stored, "tree", stored))
    for k, shape in expected.items():
        if k not in have:
            raise WeightsError(f"orbax checkpoint {directory} has no parameter {show(k)}")
        if have[k] != shape:
            raise WeightsError(
                f"orbax checkpoint {directory}: parameter {show(k)} has shape {have[k]}, "
                f"{CONFIG_FILE} implies {shape}"
            )
    extra = sorted(show(k) for k in have.keys() - expected.keys())
    if extra:
        raise WeightsError(
            f"orbax checkpoint {directory} has parameters {CONFIG_FILE} does not describe: "
            f"{', '.join(extra[:5])}"
        )
