"""Rotary frequency scaling: `RopeScaling`, and how HF configs spell it (`rope_scaling`)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Literal


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Rotary frequency scaling: `linear` (positions divided by factor), Llama 3's `llama3`, or
    `yarn` (YaRN: long wavelengths interpolated by factor, short ones kept, a linear ramp between
    the dimensions `beta_fast` and `beta_slow` rotations pick out; cos and sin scaled by
    `attention_factor`)."""

    kind: Literal["linear", "llama3", "yarn"]
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0
    truncate: bool = True  # yarn: round the ramp's ends to whole dimensions
    attention_factor: float = 1.0  # yarn: the rotated q and k are scaled by this


def hf_rope_scaling(raw: Mapping[str, Any] | None, max_positions: int) -> RopeScaling | None:
    if not raw:
        return None
    kind = raw.get("rope_type") or raw.get("type")
    if kind in (None, "default"):
        return None
    if kind == "linear":
        return RopeScaling("linear", float(raw["factor"]))
    if kind == "llama3":
        return RopeScaling(
            "llama3",
            float(raw["factor"]),
            float(raw.get("low_freq_factor", 1.0)),
            float(raw.get("high_freq_factor", 4.0)),
            int(raw.get("original_max_position_embeddings", 8192)),
        )
    if kind == "yarn":
        return _yarn(raw, max_positions)
    raise ValueError(f"unsupported rope_scaling type {kind!r}")


def _yarn(raw: Mapping[str, Any], max_positions: int) -> RopeScaling:
    """YaRN's parameters as transformers reads them (its defaults: beta_fast 32, beta_slow 1,
    truncate on, the attention factor from `factor`, `mscale` and `mscale_all_dim`)."""
    original = int(raw.get("original_max_position_embeddings") or max_positions)
    factor = float(raw.get("factor") or max_positions / original)

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = raw.get("attention_factor")
    if attention is None:
        m, m_all = raw.get("mscale"), raw.get("mscale_all_dim")
        attention = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    return RopeScaling(
        "yarn",
        factor,
        original_max_position_embeddings=original,
        beta_fast=float(raw.get("beta_fast") or 32.0),
        beta_slow=float(raw.get("beta_slow") or 1.0),
        truncate=bool(raw.get("truncate", True)),
        attention_factor=float(attention),
    )
