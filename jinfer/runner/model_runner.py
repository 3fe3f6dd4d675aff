"""The model runner: turns a `StepPlan` into padded device inputs, runs the model, samples.

Shapes are static per bucket. The flat token batch is padded to the smallest size of the token
ladder (1, 2, 4, ... on CPU, 8, 16, ... on accelerators, up to max_num_batched_tokens, then the
blocked top rungs: `buckets.py`) that holds the plan's layout: decodes per token in region
A, prefill runs in query blocks. The rows that produce logits are padded to min(bucket,
max_num_seqs). Padding tokens sit at position 0 of block-table row 0 and write to the scratch
page. So the compiled programs are one per token bucket (plus the sampler per row bucket), all
built by `warmup()`; after that `num_compiles` must stay still. With `compile_unit="layer"` (the
CPU default) "one per bucket" is one per bucket and layer kind, plus the bucket's embed and head
programs (`steps.py`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jinfer.attention.kv_cache import KVCache
from jinfer.attention.metadata import AttentionMetadata
from jinfer.config.cache import SCRATCH_PAGE, pages_for
from jinfer.config.engine import EngineConfig
from jinfer.config.model import LayerKind, ModelConfig
from jinfer.models.params import Params
from jinfer.runner import packing, steps
from jinfer.runner.buckets import Placement, place, region_a, token_buckets
from jinfer.runner.mirror import StepMirror
from jinfer.sample.sampler import PendingSamples, Sampler
from jinfer.scheduler.plan import StepPlan
from jinfer.scheduler.sequence import Sequence
from jinfer.spec_decode.budget import StepCost

log = logging.getLogger(__name__)


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


@dataclasses.dataclass
class DispatchedStep:
    """A step the device is running: the sequences it samples for, in row order, and their
    tokens, still on the device until `result()` reads them."""

    seqs: list[Sequence]
    samples: PendingSamples
    bucket: int  # tokens the step's program runs, padding included
    host_time: float  # seconds the host took to build and dispatch it

    def result(self) -> StepResult:
        """Waits for the step to finish; what it sampled, on the host."""
        t0 = time.perf_counter()
        s = self.samples.fetch()
        waited = time.perf_counter() - t0
        return StepResult(
            self.seqs, s.tokens, s.logprobs, s.top_ids, s.top_logprobs, self.host_time, waited,
            self.bucket,
        )  # fmt: skip


@dataclasses.dataclass
class ForwardStep:
    """A step whose forward pass is dispatched and whose sampling is not yet."""

    seqs: list[Sequence]  # the sequences it samples for, in logits-row order
    logits: jax.Array  # [rows, V] float32, on the device
    bucket: int
    host_time: float  # seconds the host took to build and dispatch the forward pass


class ModelRunner:
    def __init__(
        self,
        cfg: ModelConfig,
        params: Params,
        cache: KVCache,
        config: EngineConfig,  # resolved
        platform: str | None = None,  # compile for it ("cpu", "gpu", "tpu"); None: the cache's
    ) -> None:
        self.cfg = cfg
        self.params = params
        self.cache = cache
        self.page_size = cache.page_size
        self.max_num_seqs = config.max_num_seqs
        self.max_model_len = config.max_model_len
        self.backend = config.backend
        self.query_block = self.backend.query_block  # Bq; 1: prefill runs are ragged, no blocks
        self.platform = platform = platform or next(iter(cache.k[0].devices())).platform
        # A decode-only step runs a program of its own where the backend has a decode kernel
        # (chosen here, on the host: the device never branches on it).
        self.decode_kernel = self.backend.decode_kernel(platform)
        # On CPU every padding row costs its share of the matmuls, so one stream decodes in a
        # bucket of 1; on accelerators a decode step is bound by reading the weights, padding
        # rows up to 8 are free, and each extra bucket is one more program to compile.
        smallest = 1 if platform == "cpu" else 8
        self.buckets = token_buckets(
            config.max_num_batched_tokens, self.max_num_seqs, self.query_block, smallest=smallest
        )
        self.max_pages_per_seq = pages_for(self.max_model_len, self.page_size)
        self.block_tables = np.zeros((self.max_num_seqs, self.max_pages_per_seq), np.int32)
        self._written: dict[int, tuple[list[int], int]] = {}  # slot -> (table, length written)
        self.sampler = Sampler(self.max_model_len, self.max_num_seqs, platform != "cpu")
        self._idle_tokens: jax.Array | None = None  # [R] from the sampler (set by warm-up)
        self._last_tokens: jax.Array | None = None  # [R] the last sampler's `next_tokens`
        self.mirror: StepMirror | None = None  # a process group's leader: followers run it too
        self.compile_unit = config.compile_unit  # "step" or "layer"
        self._layer_kinds = tuple(cfg.layer_kind(i) for i in range(cfg.num_layers))

    def mirror_to(self, group: Any) -> None:
        """Makes this the leader of `group` (a `distributed.multihost.ProcessGroup`): from the
        end of warm-up on, every program it dispatches is sent to the followers."""
        self.mirror = self.sampler.mirror = StepMirror(group)

    # ------------------------------------------------------------------ inputs
    def _place(self, plan: StepPlan) -> Placement:
        """The layout of `plan` in the smallest bucket that holds it."""
        lengths = [n for _, n in plan.scheduled]
        rows = [seq.slot for seq, _ in plan.scheduled]
        verify = [bool(seq.draft_token_ids) for seq, _ in plan.scheduled]
        for b in self.buckets:
            if b >= plan.num_tokens:
                placement = place(lengths, rows, b, self.max_num_seqs, self.query_block, verify)
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
        decode_only: bool = False,
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
            platform=self.platform,
            decode_only=decode_only,
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

    def prepare(
        self, plan: StepPlan, prev: DispatchedStep | None = None
    ) -> tuple[tuple, list[Sequence]]:
        """The step's padded inputs (tokens, prev_idx, metadata, logits rows: `steps.forward`)
        and the sequences that sample a token, in logits-row order. A placeholder token (still
        on the device) comes from `prev`, the step that sampled it."""
        placement = self._place(plan)
        bucket = placement.bucket
        rows = self._rows(bucket)
        tokens = np.zeros(bucket, np.int32)
        prev_idx = np.full(bucket, -1, np.int32)
        prev_rows = {} if prev is None else {id(s): i for i, s in enumerate(prev.seqs)}
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
            drafts = seq.draft_token_ids  # (verified here: one sampled row per position)
            tokens[t : t + num_new] = seq.token_slice(start, end - len(drafts)) + drafts
            if seq.num_placeholders:  # its newest token is in flight: `prev` sampled it
                known = seq.num_known_tokens
                assert seq.num_placeholders == 1 and known >= start, "one step in flight"
                prev_idx[t + known - start : t + num_new] = prev_rows[id(seq)]
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
            if drafts:  # the token and each draft: what should follow each
                first = len(sampled)
                logits_idx[first : first + num_new] = np.arange(t, t + num_new, dtype=np.int32)
                sampled += [seq] * num_new
            elif end == seq.num_tokens:  # reached the end: sample a next token
                logits_idx[len(sampled)] = t + num_new - 1
                sampled.append(seq)
        meta = self._meta(
            positions,
            seq_ids,
            slot_mapping,
            self.block_tables,  # packed (copied) before the next step changes it
            placement.block_rows,
            placement.block_lens,
            decode_only=self.decode_kernel and all(n == 1 for _, n in plan.scheduled),
        )
        return (tokens, prev_idx, meta, logits_idx), sampled

    # --------------------------------------------------------------------- run
    def dispatch(self, plan: StepPlan, prev: DispatchedStep | None = None) -> DispatchedStep:
        """Builds `plan`'s inputs and sets the device running it; returns at once. `prev`: the
        step still in flight, whose sampled tokens this one may compute (async scheduling)."""
        return self.sample(self.forward(plan, prev))

    def forward(self, plan: StepPlan, prev: DispatchedStep | None = None) -> ForwardStep:
        """Dispatches `plan`'s forward pass (returns at once); `sample` then dispatches its
        sampling. In between the host may land `prev`: a sampler input built from tokens on
        the host (a grammar's mask, the penalties' history) is built while the device runs."""
        t0 = time.perf_counter()
        inputs, sampled = self.prepare(plan, prev)
        logits = self._forward(inputs, self._prev_tokens(prev))
        return ForwardStep(sampled, logits, len(inputs[0]), time.perf_counter() - t0)

    def sample(self, step: ForwardStep) -> DispatchedStep:
        """Dispatches the sampling of a dispatched forward pass; returns at once."""
        t0 = time.perf_counter()
        samples = self.sampler.sample(step.logits, step.seqs)
        self._last_tokens = samples.next_tokens
        host_time = step.host_time + time.perf_counter() - t0
        return DispatchedStep(step.seqs, samples, step.bucket, host_time)

    def _prev_tokens(self, prev: DispatchedStep | None) -> jax.Array:  # [R] int32
        """The tokens a step may read from the step before it: that step's, or, for a step
        that reads none, the sampler's array from warm-up (the same kind of input as later
        steps get, so no program is built twice)."""
        if prev is not None:
            return prev.samples.next_tokens
        if self._idle_tokens is None:  # before warm-up's first sampler program
            return jnp.zeros(self.max_num_seqs, jnp.int32)
        return self._idle_tokens

    def execute(self, plan: StepPlan) -> StepResult:
        """One step, start to finish (nothing else in flight)."""
        return self.dispatch(plan).result()

    def _forward(
        self,
        inputs: tuple,  # see `prepare`
        prev_tokens: jax.Array,  # [R] int32
        num_layers: int | None = None,  # layer programs: run only the first n layers (warm-up)
    ) -> jax.Array:  # [rows, V] float32
        layout, ibuf, fbuf = packing.pack(inputs)
        if self.mirror is not None:
            if prev_tokens is self._idle_tokens or self._idle_tokens is None:
                prev = "idle"
            elif prev_tokens is self._last_tokens:
                prev = "last"
            else:
                raise RuntimeError("a step reads tokens from neither the last step nor warm-up")
            self.mirror.forward(layout, ibuf, fbuf, prev, num_layers)
        return self.run_forward(layout, ibuf, fbuf, prev_tokens, num_layers)

    def run_forward(
        self,
        layout: packing.Layout,
        ibuf: np.ndarray,  # [Ni] int32
        fbuf: np.ndarray,  # [Nf] float32
        prev_tokens: jax.Array,  # [R] int32
        num_layers: int | None = None,
    ) -> jax.Array:  # [rows, V] float32
        """Dispatches a forward pass of packed inputs (a process group's followers call it
        with the leader's)."""
        logits, self.cache = steps.forward(
            self.params, self.cfg, self.cache, layout, ibuf, fbuf, prev_tokens,
            self.compile_unit, self._layer_kinds, num_layers,
        )  # fmt: skip
        return logits

    @property
    def idle_tokens(self) -> jax.Array:  # [R] int32
        """What a step that reads no previous tokens gets (a sampler's output, from warm-up)."""
        return self._prev_tokens(None)

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

    def warmup(self) -> float:
        """Compiles every bucket with padding-only batches (they write to the scratch page)."""
        t0 = time.perf_counter()
        num_layers = self._warmup_layers()
        programs = self.step_programs()
        if self._idle_tokens is None:
            # The tokens a step reads from the step before it are always a sampler's output,
            # placed as the sampler places it: make one first, so that every program below is
            # built for that input (the first bucket's, built for a stand-in, is built again).
            first = self._padding_inputs(programs[0][0], False)
            self._idle_tokens = self.sampler.warmup(self._forward(first, self._prev_tokens(None)))
        for bucket, decode_only in programs:
            inputs = self._padding_inputs(bucket, decode_only)
            logits = self._forward(inputs, self._idle_tokens, num_layers=num_layers)
            if not decode_only:  # the sampler's programs depend on the rows alone
                self.sampler.warmup(logits)
        if self.mirror is not None:
            self.mirror.end_warmup()
        elapsed = time.perf_counter() - t0
        log.info("warm-up compiled %d step programs in %.1f s", len(programs), elapsed)
        return elapsed

    def _padding_inputs(self, bucket: int, decode_only: bool) -> tuple:
        """A step of padding only in `bucket` (it writes to the scratch page): what warm-up
        runs, and lowering traces, to build each program."""
        zeros = np.zeros(bucket, np.int32)
        no_blocks = self._no_blocks(bucket)
        tables = np.zeros_like(self.block_tables)
        meta = self._meta(zeros, zeros, zeros, tables, no_blocks, no_blocks, decode_only)
        return zeros, np.full(bucket, -1, np.int32), meta, np.zeros(self._rows(bucket), np.int32)

    def _no_blocks(self, bucket: int) -> np.ndarray:  # [NB] int32
        """Query-block metadata (rows or lengths) of a step with no prefill run in `bucket`."""
        a = region_a(bucket, self.max_num_seqs, self.query_block)
        return np.zeros((bucket - a) // max(self.query_block, 1), np.int32)

    def step_cost(self, long_context: int = 2048, reps: int = 2) -> StepCost:
        """Times the step program of every bucket a decode-only step may run in: full of
        decodes of distinct requests at a short and at a long context, and full of one
        request's rows (a decode and its drafts) at the long one. The cost model speculative
        decoding plans its drafts with (`spec_decode/budget.py`). Their KV goes to free pages:
        call it after warm-up, before any request."""
        long_context = max(1, min(long_context, self.max_model_len - self.max_num_seqs))
        short_context = min(self.page_size, long_context)
        timings = {}
        for bucket in (b for b in self.buckets if b <= self.max_num_seqs):
            timings[bucket] = {
                "short": (short_context, self._time_decodes(bucket, short_context, 1, reps)),
                "long": (long_context, self._time_decodes(bucket, long_context, 1, reps)),
                "shared": (long_context, self._time_decodes(1, long_context, bucket, reps)),
            }
        cost = StepCost.fit(timings)
        log.info(
            "decode step cost per bucket, ms (%d-token contexts / %d / %d with all rows one "
            "request's): %s",
            short_context, long_context, long_context,
            ", ".join(
                f"{b}: " + " / ".join(f"{t[1] * 1e3:.0f}" for t in timings[b].values())
                for b in cost.buckets
            ),
        )  # fmt: skip
        return cost

    def _time_decodes(self, requests: int, context: int, rows_each: int, reps: int) -> float:
        """Median seconds of a step of `requests` requests at `context` tokens, each with
        `rows_each` rows (a decode and its drafts), in the step program of their rows' bucket."""
        rows = requests * rows_each
        bucket = next(b for b in self.buckets if b >= rows)
        pages = pages_for(context + rows_each, self.page_size)
        tables = np.full_like(self.block_tables, SCRATCH_PAGE)
        # Distinct pages while the cache has them (a small cache repeats some: cheaper reads).
        distinct = np.arange(requests * pages, dtype=np.int32) % (self.cache.num_pages - 1)
        tables[:requests, :pages] = 1 + distinct.reshape(requests, pages)
        positions = np.zeros(bucket, np.int32)
        seq_ids = np.zeros(bucket, np.int32)
        slots = np.full(bucket, SCRATCH_PAGE * self.page_size, np.int32)
        pos = context + np.tile(np.arange(rows_each, dtype=np.int32), requests)
        seq_ids[:rows] = np.repeat(np.arange(requests, dtype=np.int32), rows_each)
        positions[:rows] = pos
        # Each row writes its KV into its request's pages (a row bound for the scratch page
        # would count as padding, which attends to nothing): at warm-up no page holds anything.
        slots[:rows] = tables[seq_ids[:rows], pos // self.page_size] * self.page_size
        slots[:rows] += pos % self.page_size
        no_blocks = self._no_blocks(bucket)
        meta = self._meta(positions, seq_ids, slots, tables, no_blocks, no_blocks)
        logits_rows = np.arange(self._rows(bucket), dtype=np.int32)
        inputs = (np.zeros(bucket, np.int32), np.full(bucket, -1, np.int32), meta, logits_rows)
        times = []
        for i in range(reps + 1):  # (the first run is not timed)
            t0 = time.perf_counter()
            jax.block_until_ready(self._forward(inputs, self._prev_tokens(None)))
            if i:
                times.append(time.perf_counter() - t0)
        return float(np.median(times))

    def lower(self, lowering_platform: str) -> dict[str, jax.stages.Lowered]:
        """Every program warm-up would compile, lowered for `lowering_platform` ("cuda",
        "tpu", ...) and not compiled, by name (`runner/lowering.py` reads them)."""
        out = {}
        for bucket, decode_only in self.step_programs():
            inputs = self._padding_inputs(bucket, decode_only)
            kind = "decode-only" if decode_only else "any"
            prev_tokens = jax.ShapeDtypeStruct((self.max_num_seqs,), jnp.int32)
            lowered = steps.lower(
                self.params, self.cfg, self.cache, inputs, prev_tokens, self.compile_unit,
                self._layer_kinds, lowering_platform,
            )  # fmt: skip
            out |= {f"bucket {bucket} ({kind}) {name}": low for name, low in lowered.items()}
            if not decode_only:
                rows = self._rows(bucket)
                lowered = self.sampler.lower(rows, self.cfg.vocab_size, lowering_platform)
                out |= {f"rows {rows} {name}": low for name, low in lowered.items()}
        return out

    def step_programs(self) -> list[tuple[int, bool]]:
        """(bucket, decode_only) of every model program a step may run: one per bucket, and a
        decode-only one for each bucket a decode-only step can land in, where the backend has a
        decode kernel (a token per running request, in the smallest bucket that holds them)."""
        programs = [(b, False) for b in self.buckets]
        if self.decode_kernel:
            most = min(self.max_num_seqs, self.buckets[-1])  # one token per running request
            decode = {next(b for b in self.buckets if b >= n) for n in range(1, most + 1)}
            programs += [(b, True) for b in sorted(decode)]
        return programs
