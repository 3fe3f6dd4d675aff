"""A message channel between two ranks over TCP: a JSON header and raw numpy buffers.

Each message is a 4-byte big-endian length, that many bytes of JSON (the header: a dict with at
least "op"), then the bytes of the buffers the header lists under "buffers" as [dtype, size].
Nothing is unpickled: a header is data, a buffer is bytes read as the dtype it names (int32 and
float32 only), so a stray or hostile peer can send garbage but never code.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
from typing import Any

import numpy as np

_DTYPES = ("int32", "float32")
MAX_HEADER_BYTES = 1 << 20


class ChannelClosed(ConnectionError):
    """The peer closed the connection (or it broke)."""


class Channel:
    """One end of a connection; `send` may be called from several threads."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # a step's message, now
        self.sock = sock
        self._send_lock = threading.Lock()

    def send(self, header: dict[str, Any], *buffers: np.ndarray) -> None:
        header = {**header, "buffers": [[b.dtype.name, int(b.size)] for b in buffers]}
        for name, _ in header["buffers"]:
            if name not in _DTYPES:
                raise TypeError(f"cannot send a {name} buffer (int32 and float32 only)")
        data = json.dumps(header, separators=(",", ":")).encode()
        parts = [struct.pack(">I", len(data)), data]
        parts += [np.ascontiguousarray(b).tobytes() for b in buffers]
        try:
            with self._send_lock:
                self.sock.sendall(b"".join(parts))
        except OSError as e:
            raise ChannelClosed(f"send failed: {e}") from e

    def recv(self, timeout: float | None = None) -> tuple[dict[str, Any], list[np.ndarray]]:
        """The next message: (header, buffers). Raises ChannelClosed at the end of the stream
        and TimeoutError when `timeout` seconds pass before a message begins."""
        self.sock.settimeout(timeout)
        try:
            first = self._read(1)
        finally:
            self.sock.settimeout(None)  # a message that began is read to its end
        (length,) = struct.unpack(">I", first + self._read(3))
        if length > MAX_HEADER_BYTES:
            raise ChannelClosed(f"a {length}-byte header: not a jinfer peer")
        try:
            header = json.loads(self._read(length))
            specs = header.pop("buffers")
            buffers = []
            for name, size in specs:
                if name not in _DTYPES or not isinstance(size, int) or size < 0:
                    raise ValueError(f"bad buffer {name!r} of {size!r}")
                dtype = np.dtype(name)
                buffers.append(np.frombuffer(self._read(size * dtype.itemsize), dtype))
        except (ValueError, KeyError, TypeError) as e:
            raise ChannelClosed(f"malformed message: {e}") from e
        return header, buffers

    def _read(self, n: int) -> bytes:
        chunks = []
        while n:
            try:
                chunk = self.sock.recv(min(n, 1 << 20))
            except TimeoutError:
                raise
            except OSError as e:  # reset, or closed under us by close()
                raise ChannelClosed(f"receive failed: {e}") from e
            if not chunk:
                raise ChannelClosed("the peer closed the connection")
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
