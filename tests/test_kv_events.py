"""KV cache events (vLLM's publisher format) from a real engine to a real ZMQ subscriber: what
the events say the cache holds is what it holds, chained by content, replayable; salted pages
are never announced; bad settings are named."""

from __future__ import annotations

import hashlib
import socket
import time

import msgpack
import numpy as np
import pytest
import zmq

from jinfer import SamplingParams
from jinfer.config.engine import EngineConfig
from jinfer.scheduler.prefix_cache import root_key

PAGE = 16
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ids(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, 49000, n).tolist()


class Subscriber:
    """A SUB socket on the engine's endpoint, as a router's is."""

    def __init__(self, endpoint: str) -> None:
        self.ctx = zmq.Context()
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.connect(endpoint)
        time.sleep(0.3)  # (ZMQ's slow joiner: messages before the connection are not seen)

    def drain(self, wait: float = 0.3) -> list[tuple[int, list]]:
        out = []
        while self.sub.poll(int(wait * 1000)):
            topic, seq, payload = self.sub.recv_multipart()
            assert topic == b""
            ts, events, rank = msgpack.unpackb(payload, raw=False)
            assert ts > 0 and rank is None
            out.append((int.from_bytes(seq, "big", signed=True), events))
        return out

    def close(self) -> None:
        self.ctx.destroy(linger=0)


def _apply(index: dict[bytes, list[int]], events: list[dict]) -> None:
    """A subscriber's view of the cache: key -> its page's tokens, checking every chain."""
    for e in events:
        if e["type"] == "BlockStored":
            assert set(e) == {"type", "block_hashes", "parent_block_hash", "token_ids",
                              "block_size", "lora_id", "medium", "lora_name"}  # fmt: skip
            assert e["block_size"] == PAGE
            assert len(e["token_ids"]) == PAGE * len(e["block_hashes"])
            parent = e["parent_block_hash"]
            assert parent is None or parent in index  # anchored to what it announced
            key = root_key(None) if parent is None else parent
            for j, h in enumerate(e["block_hashes"]):  # each key names its whole prefix
                tokens = e["token_ids"][j * PAGE : (j + 1) * PAGE]
                d = hashlib.blake2b(key, digest_size=32)
                d.update(np.asarray(tokens, "<i4").tobytes())
                key = d.digest()
                assert h == key
                index[h] = tokens
        elif e["type"] == "BlockRemoved":
            assert e["medium"] is None
            for h in e["block_hashes"]:
                assert h in index, "removed a page it never announced"
                del index[h]
        else:
            assert e == {"type": "AllBlocksCleared"}
            index.clear()


@pytest.fixture
def endpoints():
    return f"tcp://127.0.0.1:{_port()}", f"tcp://127.0.0.1:{_port()}"


def test_the_events_say_what_the_prefix_cache_holds_and_replay_them(make_tiny_llm, endpoints):
    live, replay = endpoints
    config = {"enable_kv_cache_events": True, "endpoint": live, "replay_endpoint": replay}
    # 24 usable pages: three sessions of growing turns run out, so pages are evicted too.
    llm = make_tiny_llm(kv_events_config=config, num_pages=25, max_model_len=256)
    sub = Subscriber(live)
    try:
        prompts = [_ids(40 + 10 * s, s) for s in range(3)]
        for turn in range(3):
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
            prompts = [p + o.outputs[0].token_ids + _ids(30, 100 * turn + s)
                       for s, (p, o) in enumerate(zip(prompts, outs, strict=True))]  # fmt: skip
        salted = SamplingParams(temperature=0, max_tokens=2, cache_salt="tenant-a")
        llm.generate([{"prompt_token_ids": _ids(70, 99)}], salted, use_tqdm=False)
        batches = sub.drain()
        seqs = [s for s, _ in batches]
        assert seqs == list(range(len(seqs))) and len(seqs) > 3  # numbered, no holes
        index: dict[bytes, list[int]] = {}
        for _, events in batches:
            _apply(index, events)
        kinds = {e["type"] for _, events in batches for e in events}
        assert kinds == {"BlockStored", "BlockRemoved"}  # stored, and evicted
        cache = llm.engine.blocks.cache
        salted_keys = set(cache.page_of) - set(index)
        assert set(index) <= set(cache.page_of)  # nothing announced that is gone
        assert len(salted_keys) == 70 // PAGE  # exactly the salted request's pages are private
        # A subscriber that missed everything asks the replay socket from batch 0.
        ctx = zmq.Context()
        dealer = ctx.socket(zmq.DEALER)
        dealer.connect(replay)
        dealer.send_multipart([b"", (0).to_bytes(8, "big")])
        replayed = []
        while True:
            assert dealer.poll(5000), "replay stalled"
            empty, topic, seq, payload = dealer.recv_multipart()
            assert empty == b""
            if seq == (-1).to_bytes(8, "big", signed=True):
                break
            replayed.append((int.from_bytes(seq, "big"), msgpack.unpackb(payload, raw=False)[1]))
        ctx.destroy(linger=0)
        assert replayed == batches
        # An idle engine's reset empties it, and the events say so.
        llm.engine.reset_prefix_cache()
        for _, events in sub.drain():
            _apply(index, events)
        assert index == {} and llm.engine.blocks.num_cached_pages == 0
        llm.engine.check_invariants()
    finally:
        sub.close()
        llm.engine.kv_events.close()


def test_events_are_off_unless_enabled(make_tiny_llm):
    llm = make_tiny_llm(kv_events_config={"endpoint": "tcp://127.0.0.1:1"})  # (not enabled)
    llm.generate([{"prompt_token_ids": _ids(40, 0)}], GREEDY, use_tqdm=False)
    assert llm.engine.kv_events is None and llm.engine.blocks.cache.events is None


@pytest.mark.parametrize(
    "value, match",
    [
        ("{", "kv_events_config is not JSON"),
        ('{"endpont": "tcp://127.0.0.1:5557"}', "kv_events_config has no key 'endpont'"),
        ('{"enable_kv_cache_events": "yes"}', "enable_kv_cache_events must be bool"),
        ('{"publisher": "kafka"}', "publisher must be one of null, zmq"),
        ('{"endpoint": "127.0.0.1:5557"}', "endpoint must be a ZMQ endpoint"),
        ('{"buffer_steps": 0}', "buffer_steps must be at least 1"),
        ("[1]", "must be a JSON object"),
    ],
)
def test_bad_kv_events_settings_are_named(value, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig(kv_events_config=value)


def test_a_taken_endpoint_is_refused_with_its_address(make_tiny_llm):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = f"tcp://127.0.0.1:{s.getsockname()[1]}"
        with pytest.raises(RuntimeError, match=f"cannot bind KV events to {taken}"):
            make_tiny_llm(kv_events_config={"enable_kv_cache_events": True, "endpoint": taken})
