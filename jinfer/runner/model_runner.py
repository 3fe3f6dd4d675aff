"""The jitted step: turns a `StepPlan` into padded device inputs, runs the model, samples.

Shapes are static per bucket. The flat token batch is padded to the smallest size of the token
ladder (1, 2, 4, ... on CPU, 8, 16, ... on accelerators, up to max_num_batched_tokens, then the
blocked top rungs: `buckets.py`) that holds the plan's layout: decodes per token in region
A, prefill runs in query blocks. The rows that produce logits are padded to min(bucket,
max_num_seqs). Padding tokens sit at position 0 of block-table row 0 and write to the scratch
page. So the compiled programs are one per token bucket (plus the sampler per row bucket), all
built by `warmup()`; after that `num_compiles` must stay still. With `compile_unit="layer"` (the
CPU default) "one per bucket" is one per bucket and layer kind, plus the bucket's embed and head
programs.

The cache is donated to every step: the page pool is updated in place, never copied.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jinfer.attention.kv_cache import KVCache
from jinfer.attention.metadata import AttentionMetadata
from jinfer.config.cache import SCRATCH_PAGE
from jinfer.config.engine import EngineConfig
from jinfer.config.model import LayerKind, ModelConfig
from jinfer.models import decoder
from jinfer.models.params import Params
from jinfer.runner import packing
from jinfer.runner.buckets import Placement, place, region_a, token_buckets
from jinfer.sample.sampler import NEG_INF, SamplingBatch, sample, split_seed
from jinfer.sampling_params import MAX_LOGPROBS
from jinfer.scheduler.plan import StepPlan
from jinfer.scheduler.sequence import Sequence

log = logging.getLogger(__name__)

_compiles = 0
_compiles_lock = threading.Lock()
_listener_installed = False


def _on_event(event: str, duration: float, **_: Any) -> None:
    global _compiles
    if event == "/jax/core/compile/backend_compile_duration":
        with _compiles_lock:
            _compiles += 1


def num_compiles() -> int:
    """XLA compilations in this process since jinfer started counting."""
    global _listener_installed
    if not _listener_installed:
        jax.monitoring.register_event_duration_secs_listener(_on_event)
        _listener_installed = True
    return _compiles


num_compiles()  # start counting at import


# Model and sampler compile separately: a new sampling variant (penalties, a wide logit bias)
# costs a small compile, never a recompile of the model. Module-level, so engines with the same
# config and shapes share compiled programs.
#
# The engine's entry points take their small inputs packed (`packing.py`): one int32 and one
# float32 buffer per call instead of ~30 separate host-to-device copies, and the sampler hands
# back one [B, 2 + 2 * MAX_LOGPROBS] array (one device-to-host copy).
def _forward_packed(params, cfg, layout, ibuf, fbuf, cache):
    tokens, meta, logits_idx = packing.unpack(layout, ibuf, fbuf)
    return decoder.forward(params, cfg, tokens, meta, cache, logits_idx)


def _sample_packed(logits, layout, ibuf, fbuf):
    out = sample(logits, packing.unpack(layout, ibuf, fbuf))
    as_f32 = lambda a: jax.lax.bitcast_convert_type(a, jnp.float32)  # noqa: E731
    columns = [as_f32(out.tokens)[:, None], out.logprobs[:, None]]
    return jnp.concatenate(columns + [as_f32(out.top_ids), out.top_logprobs], axis=1)


_forward_step = jax.jit(_forward_packed, static_argnums=(1, 2), donate_argnums=(5,))
_sample_step = jax.jit(_sample_packed, static_argnums=(1,))


# compile_unit="layer": the same step as one program per layer kind (plus embed and head), run
# layer by layer from Python. Each program is ~1/L of the whole step, and every layer of a kind
# shares it, so warm-up compiles (and a restart loads) ~L times less code.
def _embed_packed(edge_params, cfg, layout, ibuf, fbuf):
    tokens, _, _ = packing.unpack(layout, ibuf, fbuf)
    return decoder.embed(edge_params, cfg, tokens)


def _layer_packed(p, cfg, kind, layout, ibuf, fbuf, x, k_pages, v_pages):
    _, meta, _ = packing.unpack(layout, ibuf, fbuf)
    return decoder.decoder_layer(cfg, kind, p, x, k_pages, v_pages, meta)


def _head_packed(edge_params, cfg, layout, ibuf, fbuf, x):
    _, _, logits_idx = packing.unpack(layout, ibuf, fbuf)
    return decoder.logits_head(edge_params, cfg, x, logits_idx)


_embed_step = jax.jit(_embed_packed, static_argnums=(1, 2))
_layer_step = jax.jit(_layer_packed, static_argnums=(1, 2, 3), donate_argnums=(7, 8))
_head_step = jax.jit(_head_packed, static_argnums=(1, 2))

# Width of the per-row logit-bias table: MAX_LOGIT_BIAS entries plus MAX_STOP_TOKEN_IDS bans plus
# the model's EOS ids. One fixed width (unused entries are -1 and dropped) keeps the number of
# sampler programs down; the scatter of [rows, 512] is noise next to the [rows, V] softmax.
BIAS_WIDTH = 512


@dataclasses.dataclass
class StepResult:
    """What one step produced, for the requests that reached the end of their known tokens."""

    seqs: list[Sequence]  # requests that got a new token, in row order
    tokens: np.ndarray  # [n] int32
    logprobs: np.ndarray  # [n] float32
    top_ids: np.ndarray | None  # [n, MAX_LOGPROBS] when any row wants logprobs
    top_logprobs: np.ndarray | None
    host_time: float  # seconds building inputs and dispatching the step (the device idles)
    device_time: float  # seconds then blocked until the results reached the host
    bucket: int = 0  # tokens the step's program ran, padding included


def sampling_batch(seqs: list[Sequence], rows: int, history_len: int) -> tuple[SamplingBatch, bool]:
    """Packs the sampling settings of `seqs` into `rows` padded rows (padding rows are greedy)."""
    f32 = lambda v: np.full(rows, v, np.float32)  # noqa: E731
    temperature, top_p, min_p = f32(0.0), f32(1.0), f32(0.0)
    rep, pres, freq = f32(1.0), f32(0.0), f32(0.0)
    top_k = np.zeros(rows, np.int32)
    seed_lo = np.zeros(rows, np.uint32)
    seed_hi = np.zeros(rows, np.uint32)
    counter = np.zeros(rows, np.int32)
    biases = [_logit_bias(s) for s in seqs]
    bias_ids = np.full((rows, BIAS_WIDTH), -1, np.int32)
    bias_vals = np.zeros((rows, BIAS_WIDTH), np.float32)
    want_logprobs = use_penalties = False
    for i, s in enumerate(seqs):
        p = s.params
        temperature[i], top_p[i], min_p[i], top_k[i] = p.temperature, p.top_p, p.min_p, p.top_k
        rep[i], pres[i], freq[i] = (
            p.repetition_penalty,
            p.presence_penalty,
            p.frequency_penalty,
        )
        seed_lo[i], seed_hi[i] = split_seed(s.seed)
        counter[i] = s.num_output_tokens
        bias_ids[i, : len(biases[i])] = list(biases[i])
        bias_vals[i, : len(biases[i])] = list(biases[i].values())
        want_logprobs |= p.logprobs is not None
        use_penalties |= p.uses_penalties
    history, is_output = _history(seqs if use_penalties else [], rows, history_len)
    batch = SamplingBatch(
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=rep,
        presence_penalty=pres,
        frequency_penalty=freq,
        seed_lo=seed_lo,
        seed_hi=seed_hi,
        counter=counter,
        bias_ids=bias_ids,
        bias_vals=bias_vals,
        history=history,
        history_is_output=is_output,
        want_logprobs=np.bool_(want_logprobs),
        use_penalties=np.bool_(use_penalties),
    )
    return batch, want_logprobs


def _logit_bias(seq: Sequence) -> dict[int, float]:
    """The request's logit_bias, plus a ban on stop tokens while min_tokens is not reached."""
    p = seq.params
    bias = dict(p.logit_bias)
    if seq.num_output_tokens < p.min_tokens:
        for t in list(p.stop_token_ids) + list(seq.eos_token_ids):
            bias[t] = NEG_INF
    return bias


def _history(seqs: list[Sequence], rows: int, history_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompt + output ids of each row, for penalties; a [rows, 1] stub when none uses them."""
    length = history_len if seqs else 1
    history = np.full((rows, length), -1, np.int32)
    is_output = np.zeros((rows, length), np.bool_)
    for i, s in enumerate(seqs):
        ids = s.all_token_ids()[:length]
        history[i, : len(ids)] = ids
        is_output[i, s.num_prompt_tokens : len(ids)] = True
    return history, is_output


class ModelRunner:
    def __init__(
        self,
        cfg: ModelConfig,
        params: Params,
        cache: KVCache,
        config: EngineConfig,  # resolved
    ) -> None:
        self.cfg = cfg
        self.params = params
        self.cache = cache
        self.page_size = cache.page_size
        self.max_num_seqs = max_num_seqs = config.max_num_seqs
        max_num_batched_tokens, max_model_len = config.max_num_batched_tokens, config.max_model_len
        self.max_model_len = max_model_len
        self.backend = backend = config.backend
        self.query_block = backend.query_block  # Bq; 1: prefill runs are ragged, no blocks
        platform = next(iter(cache.k[0].devices())).platform
        # On CPU every padding row costs its share of the matmuls, so one stream decodes in a
        # bucket of 1; on accelerators a decode step is bound by reading the weights, padding
        # rows up to 8 are free, and each extra bucket is one more program to compile.
        smallest = 1 if platform == "cpu" else 8
        self.buckets = token_buckets(
            max_num_batched_tokens, max_num_seqs, self.query_block, smallest=smallest
        )
        self.max_pages_per_seq = -(-max_model_len // self.page_size)
        self.block_tables = np.zeros((max_num_seqs, self.max_pages_per_seq), np.int32)
        self._written: dict[int, tuple[list[int], int]] = {}  # slot -> (table, length written)
        self._history_len = max_model_len
        self.compile_unit = config.compile_unit  # "step" or "layer"
        self._layer_kinds = tuple(cfg.layer_kind(i) for i in range(cfg.num_layers))

    # ------------------------------------------------------------------ inputs
    def _place(self, plan: StepPlan) -> Placement:
        """The layout of `plan` in the smallest bucket that holds it."""
        lengths = [n for _, n in plan.scheduled]
        rows = [seq.slot for seq, _ in plan.scheduled]
        for b in self.buckets:
            if b >= plan.num_tokens:
                placement = place(lengths, rows, b, self.max_num_seqs, self.query_block)
                if placement is not None:
                    return placement
        raise ValueError(
            f"{plan.num_tokens} tokens do not fit the largest bucket {self.buckets[-1]}"
        )

    def _meta(
        self,
        positions: np.ndarray,  # [T] int32
        seq_ids: np.ndarray,  # [T] int32
        slot_mapping: np.ndarray,  # [T] int32
        block_tables: np.ndarray,  # [R, Pmax] int32
        block_rows: np.ndarray,  # [NB] int32
        block_lens: np.ndarray,  # [NB] int32
    ) -> AttentionMetadata:
        """One constructor for steps and warm-up, so both trace the same program per bucket."""
        return AttentionMetadata(
            positions=positions,
            seq_ids=seq_ids,
            slot_mapping=slot_mapping,
            block_tables=block_tables,
            backend=self.backend,
            block_rows=block_rows,
            block_lens=block_lens,
            query_block=max(self.query_block, 1),
        )

    def _write_table(self, slot: int, table: list[int]) -> None:
        """Mirrors `table` into row `slot` of the host block tables, writing only what changed:
        tables only grow by appending, or are replaced by a new list (a new sequence, a
        preemption), so (list identity, length) says what is already there."""
        written = self._written.get(slot)
        if written is not None and written[0] is table:
            if written[1] == len(table):
                return
            self.block_tables[slot, written[1] : len(table)] = table[written[1] :]
        else:
            self.block_tables[slot, : len(table)] = table
            self.block_tables[slot, len(table) :] = SCRATCH_PAGE
        self._written[slot] = (table, len(table))

    def _rows(self, bucket: int) -> int:
        return min(bucket, self.max_num_seqs)

    def prepare(self, plan: StepPlan) -> tuple[tuple, list[Sequence], bool]:
        placement = self._place(plan)
        bucket = placement.bucket
        rows = self._rows(bucket)
        tokens = np.zeros(bucket, np.int32)
        positions = np.zeros(bucket, np.int32)
        seq_ids = np.zeros(bucket, np.int32)
        slot_mapping = np.full(bucket, SCRATCH_PAGE * self.page_size, np.int32)
        logits_idx = np.zeros(rows, np.int32)
        sampled: list[Sequence] = []
        for (seq, num_new), t in zip(plan.scheduled, placement.starts, strict=True):
            start = seq.num_computed_tokens
            end = start + num_new
            table = seq.block_table
            self._write_table(seq.slot, table)
            tokens[t : t + num_new] = seq.token_slice(start, end)
            positions[t : t + num_new] = np.arange(start, end, dtype=np.int32)
            seq_ids[t : t + num_new] = seq.slot
            if num_new == 1:  # a decode: no arrays to build
                slot_mapping[t] = table[start // self.page_size] * self.page_size
                slot_mapping[t] += start % self.page_size
            else:
                pos = positions[t : t + num_new]
                first = start // self.page_size
                pages = np.asarray(table[first : (end - 1) // self.page_size + 1], np.int32)
                slot_mapping[t : t + num_new] = (
                    pages[pos // self.page_size - first] * self.page_size + pos % self.page_size
                )
            if end == seq.num_tokens:  # reached the end: sample a next token
                logits_idx[len(sampled)] = t + num_new - 1
                sampled.append(seq)
        meta = self._meta(
            positions,
            seq_ids,
            slot_mapping,
            self.block_tables,  # packed (copied) before the next step changes it
            placement.block_rows,
            placement.block_lens,
        )
        sbatch, want_logprobs = sampling_batch(sampled, rows, self._history_len)
        return (tokens, meta, logits_idx, sbatch), sampled, want_logprobs

    # --------------------------------------------------------------------- run
    def execute(self, plan: StepPlan) -> StepResult:
        t0 = time.perf_counter()
        inputs, sampled, want_logprobs = self.prepare(plan)
        out = self._run(*inputs)  # dispatched: returns before the device finishes
        t1 = time.perf_counter()
        n = len(sampled)
        host = np.asarray(out)[:n]  # [n, 2 + 2L] float32, int columns bit-cast
        t2 = time.perf_counter()
        tokens = np.ascontiguousarray(host[:, 0]).view(np.int32)
        logprobs = np.ascontiguousarray(host[:, 1])
        top_ids = top_lps = None
        if want_logprobs:
            top_ids = np.ascontiguousarray(host[:, 2 : 2 + MAX_LOGPROBS]).view(np.int32)
            top_lps = np.ascontiguousarray(host[:, 2 + MAX_LOGPROBS :])
        bucket = len(inputs[0])
        return StepResult(sampled, tokens, logprobs, top_ids, top_lps, t1 - t0, t2 - t1, bucket)

    def _run(
        self,
        tokens: np.ndarray,
        meta: AttentionMetadata,
        logits_idx: np.ndarray,
        sbatch: SamplingBatch,
    ) -> jax.Array:  # [rows, 2 + 2 * MAX_LOGPROBS], see _sample_packed
        return self._sample(self._forward(tokens, meta, logits_idx), sbatch)

    def _forward(
        self,
        tokens: np.ndarray,
        meta: AttentionMetadata,
        logits_idx: np.ndarray,
        num_layers: int | None = None,  # layer programs: run only the first n layers (warm-up)
    ):
        layout, ibuf, fbuf = packing.pack((tokens, meta, logits_idx))
        if self.compile_unit == "step":
            logits, self.cache = _forward_step(
                self.params, self.cfg, layout, ibuf, fbuf, self.cache
            )
            return logits
        ibuf, fbuf = jax.device_put((ibuf, fbuf))  # once, not once per layer
        edges = dataclasses.replace(self.params, layers=())  # embed, final norm, lm_head
        x = _embed_step(edges, self.cfg, layout, ibuf, fbuf)  # [T, D]
        ks, vs = list(self.cache.k), list(self.cache.v)
        for i, p in enumerate(self.params.layers[:num_layers]):
            x, ks[i], vs[i] = _layer_step(
                p, self.cfg, self._layer_kinds[i], layout, ibuf, fbuf, x, ks[i], vs[i]
            )
        self.cache = KVCache(k=tuple(ks), v=tuple(vs), layout=self.cache.layout)
        return _head_step(edges, self.cfg, layout, ibuf, fbuf, x)

    def _warmup_layers(self) -> int | None:
        """How many layers a warm-up step must run for every program to be compiled: with
        layer programs, until each kind has run with another layer's output as its input (in
        a tensor-parallel mesh that input may be laid out unlike the embedding's); the rest
        would only repeat the same programs on padding (~4 s of a 10 s restart, SmolLM2)."""
        if self.compile_unit == "step":
            return None
        first_after: dict[LayerKind, int] = {}  # each kind's first layer after layer 0
        for i, kind in enumerate(self._layer_kinds[1:], start=1):
            first_after.setdefault(kind, i)
        return max(first_after.values(), default=0) + 1

    def _sample(self, logits: jax.Array, sbatch: SamplingBatch) -> jax.Array:
        layout, ibuf, fbuf = packing.pack(sbatch)
        return _sample_step(logits, layout, ibuf, fbuf)

    def warmup(self) -> float:
        """Compiles every bucket with padding-only batches (they write to the scratch page)."""
        t0 = time.perf_counter()
        num_layers = self._warmup_layers()
        for bucket in self.buckets:
            rows = self._rows(bucket)
            zeros = np.zeros(bucket, np.int32)
            a = region_a(bucket, self.max_num_seqs, self.query_block)
            no_blocks = np.zeros((bucket - a) // max(self.query_block, 1), np.int32)  # [NB]
            meta = self._meta(
                zeros, zeros, zeros, np.zeros_like(self.block_tables), no_blocks, no_blocks
            )
            logits_idx = np.zeros(rows, np.int32)
            logits = self._forward(zeros, meta, logits_idx, num_layers=num_layers)
            for sbatch in self._warmup_sampling_batches(rows):
                jax.block_until_ready(self._sample(logits, sbatch))
        elapsed = time.perf_counter() - t0
        log.info("warm-up compiled %d buckets in %.1f s", len(self.buckets), elapsed)
        return elapsed

    def _warmup_sampling_batches(self, rows: int) -> list[SamplingBatch]:
        """One batch per sampler shape variant: without and with the penalty history."""
        base, _ = sampling_batch([], rows, self._history_len)
        return [
            dataclasses.replace(
                base,
                history=np.full((rows, length), -1, np.int32),
                history_is_output=np.zeros((rows, length), np.bool_),
            )
            for length in (1, self._history_len)
        ]
