"""What a TLS connection costs the HTTPS listener, counted in process on the real
listener (tests/support/inproc.py) with real handshakes from Python's ssl client:
no ClientHello read first, no task and no timer of the listener's own when every
certificate is resident; the read-first path when one may not be; every handshake
still counted with its duration; no TLS 1.2 session kept by the server (nginx's
default: memory that grew with every full handshake); and the memory of closed
connections handed back to the system.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import subprocess
import sys
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from proxy.certs.tls import cached_sessions
from proxy.dataplane import server
from proxy.dataplane.server import HeapTrim
from tests.certgen import CA
from tests.support.inproc import CountingLoop, start_listener

HOST = "app.inproc.test"
N = 20


def _client(port: int, n: int) -> None:
    """n TLS 1.3 handshakes one after another (connect, handshake, close)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    for _ in range(n):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                ctx.wrap_socket(raw, server_hostname=HOST):
            pass


async def _settled(worker: Any) -> None:
    """Until every connection the client made has been closed on our side too."""
    deadline = asyncio.get_running_loop().time() + 30
    while worker.open_connections or worker.sessions:
        assert asyncio.get_running_loop().time() < deadline, (
            worker.open_connections, len(worker.sessions))
        await asyncio.sleep(0.01)


def _run(ca: CA, body: Callable[[Any, CountingLoop], Coroutine[Any, Any, None]],
         connections_per_client: int = 256) -> None:
    issued = ca.issue([HOST])
    loop = CountingLoop()

    async def main() -> None:
        worker = await start_listener(issued.chain_pem, issued.key_pem,
                                      connections_per_client=connections_per_client)
        try:
            await body(worker, loop)
        finally:
            await worker.drain(0)

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


def _hellos_read(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the listener's ClientHello reads (one element per read)."""
    reads: list[int] = []
    parse = server.server_name

    def counted(data: bytes | bytearray) -> Any:
        reads.append(1)
        return parse(data)

    monkeypatch.setattr(server, "server_name", counted)
    return reads


def test_a_handshake_with_every_certificate_resident_starts_no_task_and_reads_no_hello_first(
        ca: CA, monkeypatch: pytest.MonkeyPatch) -> None:
    reads = _hellos_read(monkeypatch)

    async def body(worker: Any, loop: CountingLoop) -> None:
        await loop.run_in_executor(None, _client, worker.live.https_port, 2)  # warm up
        await _settled(worker)
        loop.counts.clear()
        reads.clear()
        ok_before = worker.handshakes_ok["TLSv1.3"].pending
        timed_before = sum(worker.handshake_seconds.counts)
        await loop.run_in_executor(None, _client, worker.live.https_port, N)
        await _settled(worker)
        counts = dict(loop.counts)
        assert reads == []
        assert counts.get("create_task", 0) == 0, counts
        # Two timers a connection: the TLS protocol's handshake timeout and the HTTP
        # session's (head, then keep-alive), none of the listener's own; +2 for the
        # worker's periodic ones (metrics flush, heap check) firing meanwhile.
        assert counts.get("call_later", 0) <= 2 * N + 2, counts
        # Every handshake still has a result and a duration.
        assert worker.handshakes_ok["TLSv1.3"].pending - ok_before == N
        assert sum(worker.handshake_seconds.counts) - timed_before == N

    _run(ca, body)


def test_a_listener_that_may_lack_a_certificate_reads_the_hello_before_each_handshake(
        ca: CA, monkeypatch: pytest.MonkeyPatch) -> None:
    reads = _hellos_read(monkeypatch)
    prepared: list[object] = []

    async def body(worker: Any, loop: CountingLoop) -> None:
        worker.live.prepare_certificate = lambda entry: prepared.append(entry)
        worker.live.all_resident = lambda: False  # e.g. more domains than resident
        ok_before = worker.handshakes_ok.get("TLSv1.3")
        await loop.run_in_executor(None, _client, worker.live.https_port, N)
        await _settled(worker)
        assert len(reads) == N
        assert len(prepared) == N
        ok = worker.handshakes_ok["TLSv1.3"].pending - (ok_before.pending if ok_before else 0)
        assert ok == N

    _run(ca, body)


def _openssl_tls12_handshakes(port: int, n: int) -> None:
    """Full TLS 1.2 handshakes without tickets: each gets a session ID, which a server
    with a session cache keeps."""
    for _ in range(n):
        subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_2",
                        "-no_ticket", "-servername", HOST], input=b"", capture_output=True,
                       check=True, timeout=30)


def test_the_server_keeps_no_tls12_session_after_full_handshakes(ca: CA) -> None:
    async def body(worker: Any, loop: CountingLoop) -> None:
        await loop.run_in_executor(None, _openssl_tls12_handshakes, worker.live.https_port, 3)
        await _settled(worker)
        assert cached_sessions(worker.live.tls_context) == 0

    _run(ca, body)


_HOLDER = """
import socket, ssl, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
held = [ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=30),
                        server_hostname=sys.argv[3]) for _ in range(n)]
print("held", flush=True)
sys.stdin.read()
"""


def _hold_then_close(port: int, n: int) -> None:
    """n idle TLS connections from another process (its memory is not ours), all
    handshaken at once, then all closed."""
    with subprocess.Popen([sys.executable, "-c", _HOLDER, str(port), str(n), HOST],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as holder:
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline() == "held\n"
        holder.stdin.close()
        assert holder.wait(timeout=60) == 0


def test_memory_left_free_by_closed_connections_goes_back_to_the_system(ca: CA) -> None:
    async def body(worker: Any, loop: CountingLoop) -> None:
        worker.heap.stop()
        worker.heap = HeapTrim(loop, interval=0.2, slack=4 << 20)
        worker.heap.start()
        await loop.run_in_executor(None, _hold_then_close, worker.live.https_port, 50)
        await _settled(worker)
        start = worker.heap.rss()
        for _ in range(3):
            await loop.run_in_executor(None, _hold_then_close, worker.live.https_port, 400)
            await _settled(worker)
        # Without the trim each round left ~10-20 MB behind (freed, still resident).
        deadline = loop.time() + 15
        while worker.heap.rss() - start > 12 << 20:
            assert loop.time() < deadline, (start >> 20, worker.heap.rss() >> 20)
            await asyncio.sleep(0.1)

    _run(ca, body, connections_per_client=1000)


def _refused_handshakes(port: int, n: int) -> None:
    """n TLS 1.1 ClientHellos, refused by the listener (protocol_version)."""
    for _ in range(n):
        done = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}",
                               "-tls1_1", "-servername", HOST], input=b"",
                              capture_output=True, timeout=30)
        assert done.returncode != 0


def test_a_refused_handshake_counts_its_connection_closed_once(ca: CA) -> None:
    async def body(worker: Any, loop: CountingLoop) -> None:
        port = worker.live.https_port
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        raw = await loop.run_in_executor(
            None, lambda: socket.create_connection(("127.0.0.1", port), timeout=10))
        kept = await loop.run_in_executor(
            None, lambda: ctx.wrap_socket(raw, server_hostname=HOST))
        try:
            await loop.run_in_executor(None, _refused_handshakes, port, 3)
            # One more connection, served and closed: by then the refused ones are
            # long gone on our side too.
            await loop.run_in_executor(None, _client, port, 1)
            deadline = loop.time() + 10
            while len(worker.sessions) != 1:
                assert loop.time() < deadline, len(worker.sessions)
                await asyncio.sleep(0.02)
            # The connection limits see the one connection still open, from its client.
            assert worker.open_connections == 1
            assert worker.clients.connections("127.0.0.1") == 1
        finally:
            kept.close()
        await _settled(worker)
        assert worker.open_connections == 0

    _run(ca, body)
