"""Model configuration: one frozen dataclass, built by one adapter per source.

`ModelConfig` is hashable, so jit treats it as a static argument. Two adapters build it:
`ModelConfig.from_gguf_fields` (GGUF metadata) and `ModelConfig.from_hf_config` (an HF
`config.json` dict). Everything else in jinfer reads only this dataclass.

Dimension alphabet used in shape comments across jinfer:
  B batch (requests)   T tokens (flat step batch)   S key length   D model width
  F ffn width          N query heads                K kv heads     G query heads per kv head (N / K)
  H head dim           V vocab                      L layers       P pages      Z page size
  E experts            X experts per token (top-k)  C expert ffn width
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from typing import Any, Literal

from jinfer.config.rope import RopeScaling, hf_rope_scaling

Arch = Literal["llama", "gemma3"]
LayerType = Literal["full", "sliding"]

# HF `model_type` values handled by the Llama-family code path.
_LLAMA_FAMILY = (
    "llama", "mistral", "qwen2", "qwen3", "smollm2", "smollm3", "qwen3_moe", "mixtral", "gpt_oss",
)  # fmt: skip
_MOE_TYPES = ("qwen3_moe", "mixtral", "gpt_oss")
_GEMMA3_TYPES = ("gemma3", "gemma3_text")


@dataclasses.dataclass(frozen=True)
class LayerKind:
    """What differs between layers of one model: layers of one kind run the same program."""

    window: int | None  # sliding window, or None for full attention
    rope_theta: float
    rope_scaling: RopeScaling | None
    moe: bool = False  # a mixture-of-experts MLP (else dense)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything the forward pass needs to know about a decoder-only model."""

    arch: Arch
    vocab_size: int  # V
    hidden_size: int  # D
    intermediate_size: int  # F
    num_layers: int  # L
    num_heads: int  # N
    num_kv_heads: int  # K
    head_dim: int  # H
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Rope base for sliding-window layers (Gemma 3 uses a smaller base locally).
    rope_local_theta: float | None = None
    rope_scaling: RopeScaling | None = None
    # One entry per layer; `sliding` layers attend to the last `sliding_window` positions.
    layer_types: tuple[LayerType, ...] = ()
    sliding_window: int | None = None
    qk_norm: bool = False
    qkv_bias: bool = False
    o_bias: bool = False  # a bias on the attention output projection
    # gpt-oss: one learned logit per query head in every softmax's denominator (a key no query
    # position holds, with no value: "attention sinks").
    attention_sinks: bool = False
    # Gemma: extra norms after attention and after the MLP, before the residual add.
    post_norms: bool = False
    hidden_act: Literal["silu", "gelu_tanh"] = "silu"
    embed_scale: float = 1.0
    # Scale applied to q before q.k; None means head_dim ** -0.5.
    query_scale: float | None = None
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 8192
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # Mixture of experts (num_experts 0: every MLP dense). A sparse layer's MLP is a router
    # over E experts of width C, each token running its top X (weights renormalized over the
    # X when norm_topk_prob); `moe_layers[i]`: layer i is sparse (the others are dense, F wide).
    num_experts: int = 0  # E
    num_experts_per_tok: int = 0  # X
    moe_intermediate_size: int = 0  # C
    norm_topk_prob: bool = True
    moe_layers: tuple[bool, ...] = ()
    router_bias: bool = False  # gpt-oss: the router's scores have a bias, its experts too
    expert_bias: bool = False
    # gpt-oss's clamped SwiGLU (None: the plain one): gate clamped above at the limit, up to
    # [-limit, limit]; out = (up + 1) * gate * sigmoid(alpha * gate).
    swiglu_limit: float | None = None
    swiglu_alpha: float = 1.702
    # How the engine runs a mixture of experts, not what the checkpoint says (the builder sets
    # them): over how many tensor-parallel devices, and whether the experts are split over them
    # (expert parallelism, `enable_expert_parallel`) rather than each expert's width.
    tensor_parallel_size: int = 1
    expert_parallel: bool = False

    def __post_init__(self) -> None:
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads")
        for name in positive + ("num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})"
            )
        if not self.layer_types:
            object.__setattr__(self, "layer_types", ("full",) * self.num_layers)
        if len(self.layer_types) != self.num_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers"
            )
        if "sliding" in self.layer_types and not self.sliding_window:
            raise ValueError("sliding layers need a positive sliding_window")
        if self.num_experts:
            if not 1 <= self.num_experts_per_tok <= self.num_experts:
                raise ValueError(
                    f"num_experts_per_tok must be in [1, num_experts={self.num_experts}], got "
                    f"{self.num_experts_per_tok}"
                )
            if self.moe_intermediate_size <= 0:
                raise ValueError("a mixture of experts needs a positive moe_intermediate_size")
            if not self.moe_layers:
                object.__setattr__(self, "moe_layers", (True,) * self.num_layers)
        elif any(self.moe_layers):
            raise ValueError("moe_layers marks sparse layers, but num_experts is 0")
        if self.moe_layers and len(self.moe_layers) != self.num_layers:
            raise ValueError(
                f"moe_layers has {len(self.moe_layers)} entries for {self.num_layers} layers"
            )
        if self.expert_parallel:
            if not self.num_experts:
                raise ValueError("expert parallelism needs a mixture of experts; this has none")
            if self.num_experts % self.tensor_parallel_size:
                raise ValueError(
                    f"num_experts={self.num_experts} does not split evenly over "
                    f"{self.tensor_parallel_size} devices (expert parallelism)"
                )

    # ----------------------------------------------------------------- derived
    @property
    def q_per_kv(self) -> int:  # G
        return self.num_heads // self.num_kv_heads

    @property
    def scale(self) -> float:
        return self.query_scale if self.query_scale is not None else self.head_dim**-0.5

    def layer_window(self, layer: int) -> int | None:
        """Sliding window of `layer`, or None for a full-attention layer."""
        return self.sliding_window if self.layer_types[layer] == "sliding" else None

    def layer_rope_theta(self, layer: int) -> float:
        if self.layer_types[layer] == "sliding" and self.rope_local_theta is not None:
            return self.rope_local_theta
        return self.rope_theta

    def layer_rope_scaling(self, layer: int) -> RopeScaling | None:
        # Gemma 3 scales only its global layers' rope; local layers keep the plain base.
        if self.layer_types[layer] == "sliding" and self.rope_local_theta is not None:
            return None
        return self.rope_scaling

    def is_moe_layer(self, layer: int) -> bool:
        return bool(self.moe_layers) and self.moe_layers[layer]

    def layer_kind(self, layer: int) -> LayerKind:
        return LayerKind(
            self.layer_window(layer),
            self.layer_rope_theta(layer),
            self.layer_rope_scaling(layer),
            self.is_moe_layer(layer),
        )

    def _mlp_params(self, layer: int, active: bool) -> int:
        """An MLP's weights (`active`: only those one token runs)."""
        d = self.hidden_size
        if not self.is_moe_layer(layer):
            return 3 * d * self.intermediate_size
        experts = self.num_experts_per_tok if active else self.num_experts
        c, e = self.moe_intermediate_size, self.num_experts
        biases = (2 * c + d) * experts if self.expert_bias else 0
        return d * e + (e if self.router_bias else 0) + 3 * d * c * experts + biases

    def num_params(self, active: bool = False) -> int:
        """Weights in all (`active`: those one token's forward pass reads: a mixture of experts
        counts the X experts a token runs, not all E)."""
        d, h = self.hidden_size, self.head_dim
        attn = d * h * (2 * self.num_heads + 2 * self.num_kv_heads)
        mlps = sum(self._mlp_params(i, active) for i in range(self.num_layers))
        embed = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * attn + mlps + embed

    def flops_per_token(self) -> int:
        """Matmul FLOPs of one token's forward pass, attention scores excluded (2 per MAC);
        a mixture of experts counts the experts a token runs."""
        d, h = self.hidden_size, self.head_dim
        attn = d * h * (2 * self.num_heads + 2 * self.num_kv_heads)
        mlps = sum(self._mlp_params(i, active=True) for i in range(self.num_layers))
        return 2 * (self.num_layers * attn + mlps + self.vocab_size * d)

    # ------------------------------------------------------------- (de)serialize
    def to_json(self) -> str:
        raw = dataclasses.asdict(self)
        del raw["tensor_parallel_size"], raw["expert_parallel"]  # how an engine ran it
        return json.dumps(raw, indent=2)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        raw = json.loads(text)
        if raw.get("rope_scaling"):
            raw["rope_scaling"] = RopeScaling(**raw["rope_scaling"])
        for key in ("layer_types", "eos_token_ids", "moe_layers"):
            raw[key] = tuple(raw.get(key) or ())
        return cls(**raw)

    # ------------------------------------------------------------------ adapters
    @classmethod
    def from_gguf_fields(cls, meta: Mapping[str, Any]) -> ModelConfig:
        """Builds a config from GGUF metadata (key -> python value)."""
        arch = meta.get("general.architecture")
        if arch not in ("llama", "gemma3", "qwen2", "qwen3", "qwen3moe", "mistral"):
            raise ValueError(f"unsupported GGUF architecture {arch!r}")

        def get(key: str, default: Any = None) -> Any:
            return meta.get(f"{arch}.{key}", default)

        num_heads = int(get("attention.head_count"))
        hidden = int(get("embedding_length"))
        head_dim = int(get("attention.key_length", hidden // num_heads))
        num_layers = int(get("block_count"))
        vocab = meta.get(f"{arch}.vocab_size") or len(meta["tokenizer.ggml.tokens"])
        eos = meta.get("tokenizer.ggml.eos_token_id")
        common = dict(
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length")),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=int(get("attention.head_count_kv", num_heads)),
            head_dim=head_dim,
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            max_position_embeddings=int(get("context_length", 8192)),
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=(int(eos),) if eos is not None else (),
        )
        factor = get("rope.scaling.factor")
        if factor and get("rope.scaling.type", "linear") == "linear" and float(factor) != 1.0:
            common["rope_scaling"] = RopeScaling("linear", float(factor))
        if arch == "gemma3":
            window = int(get("attention.sliding_window", 4096))
            return cls(
                arch="gemma3",
                **common,
                rope_local_theta=10000.0,
                layer_types=_gemma3_layer_types(num_layers),
                sliding_window=window,
                qk_norm=True,
                post_norms=True,
                hidden_act="gelu_tanh",
                embed_scale=math.sqrt(hidden),
                query_scale=head_dim**-0.5,
                tie_word_embeddings=True,
            )
        moe = {}
        if int(get("expert_count", 0) or 0):  # Qwen3-MoE, or Mixtral (a llama with experts)
            width = get("expert_feed_forward_length", get("feed_forward_length"))
            moe = dict(
                num_experts=int(get("expert_count")),
                num_experts_per_tok=int(get("expert_used_count", 2)),
                moe_intermediate_size=int(width),
                norm_topk_prob=bool(get("expert_weights_norm", True)),
                # (which layers are sparse: the loader sees which have a router)
            )
        return cls(
            arch="llama",
            **common,
            qk_norm=arch in ("qwen3", "qwen3moe"),
            qkv_bias=arch == "qwen2",
            tie_word_embeddings=False,  # decided by the loader: true when output.weight is absent
            **moe,
        )

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any]) -> ModelConfig:
        """Builds a config from an HF `config.json` dict (Llama family or Gemma 3)."""
        cfg = _hf_legacy_rope(dict(cfg))
        if cfg.get("model_type") == "gemma3" and "text_config" in cfg:
            cfg = {**cfg["text_config"], "model_type": "gemma3_text"}
        model_type = cfg.get("model_type")
        num_heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        head_dim = int(cfg.get("head_dim") or hidden // num_heads)
        num_layers = int(cfg["num_hidden_layers"])
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        common = dict(
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
            head_dim=head_dim,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(cfg.get("rope_theta", 10000.0)),
            rope_scaling=hf_rope_scaling(
                cfg.get("rope_scaling"), int(cfg.get("max_position_embeddings", 8192))
            ),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 8192)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", model_type in _GEMMA3_TYPES)),
        )
        if model_type in _GEMMA3_TYPES:
            layer_types = cfg.get("layer_types")
            if layer_types:
                types = tuple(
                    "sliding" if t == "sliding_attention" else "full" for t in layer_types
                )
            else:
                types = _gemma3_layer_types(num_layers, int(cfg.get("sliding_window_pattern", 6)))
            return cls(
                arch="gemma3",
                **common,
                rope_local_theta=float(cfg.get("rope_local_base_freq", 10000.0)),
                layer_types=types,
                sliding_window=int(cfg.get("sliding_window") or 4096),
                qk_norm=True,
                post_norms=True,
                hidden_act="gelu_tanh",
                embed_scale=math.sqrt(hidden),
                query_scale=float(cfg.get("query_pre_attn_scalar", head_dim)) ** -0.5,
                attn_logit_softcap=cfg.get("attn_logit_softcapping"),
                final_logit_softcap=cfg.get("final_logit_softcapping"),
            )
        if model_type not in _LLAMA_FAMILY:
            raise ValueError(
                f"unsupported model_type {model_type!r}; supported: "
                f"{', '.join(_LLAMA_FAMILY + _GEMMA3_TYPES)}"
            )
        moe = _hf_moe(cfg, num_layers) if model_type in _MOE_TYPES else {}
        window = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None
        types: tuple[LayerType, ...] = ()
        if model_type == "gpt_oss":  # sliding and full layers alternate, as layer_types says
            listed = cfg.get("layer_types") or [
                "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)
            ]
            types = tuple("sliding" if t == "sliding_attention" else "full" for t in listed)
            types = types if "sliding" in types else ()
        elif model_type in ("mistral", "mixtral") and window:
            types = ("sliding",) * num_layers
        elif (
            model_type in ("qwen2", "qwen3", "qwen3_moe")
            and cfg.get("use_sliding_window")
            and window
        ):
            first_full = int(cfg.get("max_window_layers", num_layers))
            types = tuple("sliding" if i >= first_full else "full" for i in range(num_layers))
        return cls(
            arch="llama",
            **common,
            layer_types=types,
            sliding_window=int(window) if types and window else None,
            qk_norm=model_type in ("qwen3", "qwen3_moe"),
            qkv_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
            # transformers' attention_bias covers o_proj too (Qwen2's q/k/v biases do not)
            o_bias=model_type != "qwen2" and bool(cfg.get("attention_bias", False)),
            attention_sinks=model_type == "gpt_oss",
            hidden_act="silu",
            **moe,
        )


def _hf_moe(cfg: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
    """The experts of gpt-oss (every layer sparse, biased router and experts, clamped SwiGLU),
    Qwen3-MoE (layer i is sparse unless listed in `mlp_only_layers`, and only
    every `decoder_sparse_step`-th layer is: transformers' rule) and Mixtral (every layer
    sparse, `intermediate_size` wide, the top X weights always renormalized)."""
    num_experts = int(cfg.get("num_experts") or cfg.get("num_local_experts") or 0)
    if cfg.get("model_type") == "gpt_oss":  # softmax over the top X scores: renormalized
        return dict(
            num_experts=num_experts,
            num_experts_per_tok=int(cfg.get("num_experts_per_tok") or 4),
            moe_intermediate_size=int(cfg["intermediate_size"]),
            norm_topk_prob=True,
            moe_layers=(True,) * num_layers,
            router_bias=True,
            expert_bias=True,
            swiglu_limit=float(cfg.get("swiglu_limit", 7.0)),
            swiglu_alpha=float(cfg.get("swiglu_alpha", 1.702)),
        )
    if cfg.get("model_type") == "mixtral":
        return dict(
            num_experts=num_experts,
            num_experts_per_tok=int(cfg.get("num_experts_per_tok") or 2),
            moe_intermediate_size=int(cfg["intermediate_size"]),
            norm_topk_prob=True,
            moe_layers=(True,) * num_layers,
        )
    step = int(cfg.get("decoder_sparse_step") or 1)
    dense = set(cfg.get("mlp_only_layers") or ())
    layers = tuple(
        num_experts > 0 and i not in dense and (i + 1) % step == 0 for i in range(num_layers)
    )
    return dict(
        num_experts=num_experts,
        num_experts_per_tok=int(cfg.get("num_experts_per_tok") or 0),
        moe_intermediate_size=int(cfg.get("moe_intermediate_size") or 0),
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
        moe_layers=layers if num_experts else (),
    )


def _gemma3_layer_types(num_layers: int, pattern: int = 6) -> tuple[LayerType, ...]:
    """Gemma 3: every `pattern`-th layer is global, the others slide."""
    return tuple("full" if (i + 1) % pattern == 0 else "sliding" for i in range(num_layers))


def _hf_legacy_rope(cfg: dict[str, Any]) -> dict[str, Any]:
    """transformers >= 5 writes `rope_parameters` ({rope_type, rope_theta, factor, ...}, or one such
    dict per layer type for Gemma 3) where 4.x wrote rope_theta / rope_scaling /
    rope_local_base_freq; `ModelConfig.from_hf_config` reads the 4.x keys, so translate."""
    if isinstance(cfg.get("text_config"), dict):
        cfg = {**cfg, "text_config": _hf_legacy_rope(cfg["text_config"])}
    rope = cfg.get("rope_parameters")
    if not isinstance(rope, dict):
        return cfg
    cfg = dict(cfg)
    full = rope.get("full_attention", rope)
    if "rope_theta" in full:
        cfg["rope_theta"] = full["rope_theta"]
    kind = full.get("rope_type") or full.get("type")
    cfg["rope_scaling"] = None if kind in (None, "default") else full
    local = rope.get("sliding_attention")
    if isinstance(local, dict) and "rope_theta" in local:
        cfg["rope_local_base_freq"] = local["rope_theta"]
    return cfg
