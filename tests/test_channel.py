"""The step channel between ranks: headers and int32/float32 buffers arrive intact, anything
else (a pickle, a huge or malformed header, a closed peer) is refused, never executed."""

from __future__ import annotations

import json
import socket
import struct
import threading

import numpy as np
import pytest

from jinfer.distributed.channel import Channel, ChannelClosed


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Two ends of a real TCP connection on localhost (the channel sets TCP options)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        a = socket.create_connection(server.getsockname())
        b, _ = server.accept()
    return a, b


@pytest.fixture
def pair():
    a, b = _tcp_pair()
    left, right = Channel(a), Channel(b)
    yield left, right
    left.close()
    right.close()


def test_a_message_arrives_with_its_header_and_buffers(pair):
    left, right = pair
    ints = np.arange(7, dtype=np.int32)
    floats = np.linspace(0, 1, 5, dtype=np.float32)
    left.send({"op": "forward", "program": 3}, ints, floats, np.zeros(0, np.int32))
    header, buffers = right.recv(timeout=5)
    assert header == {"op": "forward", "program": 3}
    np.testing.assert_array_equal(buffers[0], ints)
    np.testing.assert_array_equal(buffers[1], floats)
    assert buffers[2].dtype == np.int32 and buffers[2].size == 0


def test_messages_from_several_threads_never_interleave(pair):
    left, right = pair
    big = np.arange(200_000, dtype=np.int32)

    def send(i):
        for _ in range(20):
            left.send({"op": "step", "from": i}, big + i)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for _ in range(60):
        header, (buf,) = right.recv(timeout=10)
        np.testing.assert_array_equal(buf, big + header["from"])
    for t in threads:
        t.join()


def test_only_int32_and_float32_buffers_are_sent(pair):
    left, _ = pair
    with pytest.raises(TypeError, match="cannot send a object buffer"):
        left.send({"op": "x"}, np.array([{"a": 1}], dtype=object))


def test_recv_times_out_before_a_message_begins(pair):
    _, right = pair
    with pytest.raises(TimeoutError):
        right.recv(timeout=0.05)


def test_a_closed_peer_ends_the_stream(pair):
    left, right = pair
    left.close()
    with pytest.raises(ChannelClosed, match="closed"):
        right.recv(timeout=5)


def _raw(sock: socket.socket, header: bytes, body: bytes = b"") -> None:
    sock.sendall(struct.pack(">I", len(header)) + header + body)


@pytest.mark.parametrize(
    "header, match",
    [
        (b"\x80\x04\x95pickle", "malformed message"),
        (json.dumps({"op": "x", "buffers": [["object", 1]]}).encode(), "bad buffer 'object'"),
        (json.dumps({"op": "x", "buffers": [["int32", -1]]}).encode(), "bad buffer"),
        (json.dumps({"op": "x"}).encode(), "malformed message"),
    ],
)
def test_a_hostile_message_is_refused_not_loaded(header, match):
    a, b = _tcp_pair()
    right = Channel(b)
    _raw(a, header)
    with pytest.raises(ChannelClosed, match=match):
        right.recv(timeout=5)
    a.close()
    right.close()


def test_a_huge_header_is_refused_before_it_is_read():
    a, b = _tcp_pair()
    right = Channel(b)
    a.sendall(struct.pack(">I", 1 << 30))
    with pytest.raises(ChannelClosed, match="not a jinfer peer"):
        right.recv(timeout=5)
    a.close()
    right.close()
