"""KV cache events on a ZMQ PUB socket, as vLLM's KV-event publisher sends them.

Each engine step's prefix-cache changes (`scheduler/prefix_cache.py`: pages stored, pages
removed) go out as one batch, a three-frame message:

    [topic, seq, payload]    topic: bytes (config.topic, "" by default)
                             seq: the batch's number, 8 bytes big-endian, 0, 1, 2, ... no holes
                             payload: msgpack [ts, events, data_parallel_rank]

each event a msgpack map tagged by "type": {"type": "BlockStored", "block_hashes",
"parent_block_hash", "token_ids", "block_size", "lora_id", "medium", "lora_name"},
{"type": "BlockRemoved", "block_hashes", "medium"}, {"type": "AllBlocksCleared"}. Block hashes
are the prefix cache's page keys (32 raw bytes, chained through `parent_block_hash`; None starts
a prompt); a subscriber such as vllm-router hashes `token_ids` itself to match requests.

A subscriber that missed batches (it connected late, or its queue overflowed) asks the replay
socket (`replay_endpoint`, ZMQ ROUTER) for them: it sends [b"", start_seq] and gets every kept
batch from `start_seq` on as [b"", topic, seq, payload], then [b"", b"", -1, b""]. The last
`buffer_steps` batches are kept.

Publishing runs on the engine thread (a few microseconds: msgpack, then a non-blocking send
that ZMQ drops past `hwm` queued messages); replays are served by a thread of their own.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any

from jinfer.config.kv_events import KVEventsConfig

log = logging.getLogger(__name__)

END_OF_REPLAY = (-1).to_bytes(8, "big", signed=True)


def _modules() -> tuple[Any, Any]:
    try:
        import msgpack
        import zmq
    except ImportError as e:
        raise RuntimeError(
            f"KV cache events need pyzmq and msgpack ({e.name} is missing): "
            "pip install 'jinfer[router]'"
        ) from None
    return zmq, msgpack


class KVEventPublisher:
    """Binds the PUB socket (and the replay socket) of `config`; `publish` sends a batch."""

    def __init__(self, config: KVEventsConfig) -> None:
        zmq, self._msgpack = _modules()
        self.config = config
        self.topic = config.topic.encode()
        self._ctx = zmq.Context()
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.SNDHWM, config.hwm)
        self._pub.setsockopt(zmq.LINGER, 0)
        try:
            self._pub.bind(config.endpoint)
        except zmq.ZMQError as e:
            self._ctx.destroy(linger=0)
            raise RuntimeError(f"cannot bind KV events to {config.endpoint}: {e}") from None
        self.seq = 0
        self.num_events = 0
        self.publish_time = 0.0  # seconds spent packing and sending (on the engine thread)
        self._kept: collections.deque[tuple[int, bytes]] = collections.deque(
            maxlen=config.buffer_steps
        )
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._replay = None
        if config.replay_endpoint is not None:
            self._replay = self._ctx.socket(zmq.ROUTER)
            self._replay.setsockopt(zmq.LINGER, 0)
            self._replay.bind(config.replay_endpoint)
            threading.Thread(
                target=self._serve_replays, name="jinfer-kv-replay", daemon=True
            ).start()
        log.info(
            "KV cache events on %s (replay: %s)", config.endpoint, config.replay_endpoint or "off"
        )

    def publish(self, events: list[dict[str, Any]]) -> None:
        """Sends `events` as the next batch (nothing for an empty list)."""
        if not events or self._closed.is_set():
            return
        t0 = time.perf_counter()
        payload = self._msgpack.packb([time.time(), events, None], use_bin_type=True)
        seq = self.seq.to_bytes(8, "big", signed=True)
        with self._lock:
            self._kept.append((self.seq, payload))
        try:
            self._pub.send_multipart([self.topic, seq, payload], copy=False)
        except Exception:  # noqa: BLE001 - a lost batch is replayable; never fail a step
            log.exception("could not send KV events batch %d", self.seq)
        self.seq += 1
        self.num_events += len(events)
        self.publish_time += time.perf_counter() - t0

    def _serve_replays(self) -> None:
        zmq = _modules()[0]
        poller = zmq.Poller()
        poller.register(self._replay, zmq.POLLIN)
        while not self._closed.is_set():
            try:
                if not dict(poller.poll(200)):
                    continue
                frames = self._replay.recv_multipart()
            except zmq.ZMQError:
                return  # closed
            if len(frames) != 3 or len(frames[2]) != 8:
                log.warning("KV events replay: a malformed request (%d frames)", len(frames))
                continue
            identity, start = frames[0], int.from_bytes(frames[2], "big", signed=True)
            with self._lock:
                batches = [(s, p) for s, p in self._kept if s >= start]
            try:
                for s, payload in batches:
                    seq = s.to_bytes(8, "big", signed=True)
                    self._replay.send_multipart([identity, b"", self.topic, seq, payload])
                self._replay.send_multipart([identity, b"", b"", END_OF_REPLAY, b""])
            except zmq.ZMQError:
                return

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        time.sleep(0.25)  # the replay thread's poll ends
        self._ctx.destroy(linger=0)
