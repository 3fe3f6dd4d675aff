"""`--kv-events-config`: vLLM's KV cache events settings, parsed and checked at start-up.

The engine announces what its prefix cache holds (pages stored, pages removed) on a ZMQ PUB
socket in the format of vLLM's KV-event publisher, so that a KV-aware router (vllm-router's
`kv_aware` policy) routes each request to the replica that really holds its prefix. The keys
and defaults are vLLM's `KVEventsConfig`; the endpoint binds to 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from jinfer.config.json_option import json_object

PUBLISHERS = ("null", "zmq")


@dataclasses.dataclass(frozen=True)
class KVEventsConfig:
    enable_kv_cache_events: bool = False
    publisher: str | None = None  # None: "zmq" when events are enabled, else "null"
    endpoint: str = "tcp://127.0.0.1:5557"  # where the PUB socket binds
    replay_endpoint: str | None = None  # a ROUTER socket replaying recent batches, if set
    buffer_steps: int = 10_000  # batches kept for replay
    hwm: int = 100_000  # the PUB socket's send high-water mark (messages)
    max_queue_size: int = 100_000  # (vLLM's; events are sent as they are made)
    topic: str = ""

    @property
    def enabled(self) -> bool:
        return self.enable_kv_cache_events and self.publisher != "null"

    @classmethod
    def parse(cls, text: str | dict[str, Any] | None) -> KVEventsConfig:
        """From JSON (the flag) or a dict (`LLM(kv_events_config=...)`); ValueError naming the
        first key or value it does not take."""
        raw = json_object(text)
        if raw is None:
            return cls()
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for key, value in raw.items():
            if key not in fields:
                raise ValueError(f"has no key {key!r} (it takes {', '.join(fields)})")
            _check_value(key, value)
        config = cls(**raw)
        if config.publisher is None:
            config = dataclasses.replace(
                config, publisher="zmq" if config.enable_kv_cache_events else "null"
            )
        for name in ("endpoint", "replay_endpoint"):
            value = getattr(config, name)
            if value is not None and not value.startswith(("tcp://", "ipc://", "inproc://")):
                raise ValueError(
                    f"{name} must be a ZMQ endpoint like tcp://HOST:PORT, got {value!r}"
                )
        return config

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"))


_TYPES = {
    "enable_kv_cache_events": (bool,),
    "publisher": (str, type(None)),
    "endpoint": (str,),
    "replay_endpoint": (str, type(None)),
    "buffer_steps": (int,),
    "hwm": (int,),
    "max_queue_size": (int,),
    "topic": (str,),
}


def _check_value(key: str, value: Any) -> None:
    kinds = _TYPES[key]
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise ValueError(f"{key} must be {' or '.join(k.__name__ for k in kinds)}, got {value!r}")
    if key == "publisher" and value is not None and value not in PUBLISHERS:
        raise ValueError(f"publisher must be one of {', '.join(PUBLISHERS)}, got {value!r}")
    if key in ("buffer_steps", "hwm", "max_queue_size") and value < 1:
        raise ValueError(f"{key} must be at least 1, got {value}")
