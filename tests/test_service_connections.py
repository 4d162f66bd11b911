"""Stalled and slow connections against a real ``serve``: cut after the read timeout, and a flood of them
cannot starve a client that sends whole requests (loopback only, a bounded number of sockets, all closed)."""

from __future__ import annotations

import socket
import time

import pytest
import requests

from keyframe_worlds.engine.testing.service import Engine, wait_for

TIMEOUT = 20
FLOOD = 600


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("service_connections")
    with Engine(root / "jobs", extra_args=("--device", "cpu", "--read-timeout-s", "2")) as eng:
        eng.start()
        yield eng


def auth(engine):
    return {"Authorization": f"Bearer {engine.token}"}


def open_stalled(engine, count, first_bytes=b""):
    sockets = []
    try:
        for _ in range(count):
            s = socket.create_connection(("127.0.0.1", engine.port), timeout=5)
            if first_bytes:
                s.sendall(first_bytes)
            sockets.append(s)
    except BaseException:
        for s in sockets:
            s.close()
        raise
    return sockets


def closed_by_server(s: socket.socket) -> bool:
    s.settimeout(0.01)
    try:
        return s.recv(1) == b""
    except (TimeoutError, socket.timeout, BlockingIOError):
        return False
    except OSError:
        return True


@pytest.mark.parametrize("first_bytes", [b"", b"GET /v1/health HTTP/1.1\r\nHost: x\r\n"], ids=["silent", "half-headers"])
def test_a_flood_of_stalled_connections_does_not_starve_whole_requests(engine, first_bytes):
    sockets = open_stalled(engine, FLOOD, first_bytes)
    try:
        time.sleep(0.2)  # let the server accept them all
        with requests.Session() as session:
            start = time.monotonic()
            r = session.get(f"{engine.url}/v1/jobs", headers=auth(engine), timeout=TIMEOUT)
            took = time.monotonic() - start
            assert r.status_code == 200, r.text
            assert took < 1.0, f"an authenticated request took {took:.2f} s behind {FLOOD} stalled connections"
            health = session.get(f"{engine.url}/v1/health", timeout=TIMEOUT)
            assert health.status_code == 200
        # the cap closed the longest-idle ones first: most of the flood is gone already
        assert sum(closed_by_server(s) for s in sockets[:100]) == 100
    finally:
        for s in sockets:
            s.close()


@pytest.mark.parametrize("first_bytes", [b"", b"GET /v1/health HTTP/1.1\r\n"], ids=["silent", "half-headers"])
def test_stalled_connections_are_closed_after_the_read_timeout(engine, first_bytes):
    sockets = open_stalled(engine, 3, first_bytes)
    try:
        start = time.monotonic()
        wait_for(lambda: all(closed_by_server(s) for s in sockets), timeout=10, what="the server to close stalled connections")
        assert 1.5 < time.monotonic() - start + 0.2 < 6  # the 2 s timeout, not at once and not never
    finally:
        for s in sockets:
            s.close()


def test_trickling_header_bytes_does_not_extend_the_timeout(engine):
    s = socket.create_connection(("127.0.0.1", engine.port), timeout=5)
    try:
        start = time.monotonic()
        for byte in b"GET /v1/health HTTP/1.1\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaa":
            s.sendall(bytes([byte]))
            time.sleep(0.25)
            if closed_by_server(s):
                break
        assert closed_by_server(s) and time.monotonic() - start < 5
    finally:
        s.close()


def test_a_stalled_body_is_cut_but_a_slow_whole_request_is_served(engine):
    s = socket.create_connection(("127.0.0.1", engine.port), timeout=5)
    try:
        s.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + engine.token.encode()
                  + b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"a\":")
        start = time.monotonic()
        wait_for(lambda: closed_by_server(s), timeout=15, what="the server to close a stalled body")
        assert 5 < time.monotonic() - start < 12  # body idle: 3x the 2 s read timeout
    finally:
        s.close()
    # an idle keep-alive connection that then sends a whole request in time is served as before
    with requests.Session() as session:
        assert session.get(f"{engine.url}/v1/health", timeout=TIMEOUT).status_code == 200
        time.sleep(1.0)
        assert session.get(f"{engine.url}/v1/jobs", headers=auth(engine), timeout=TIMEOUT).status_code == 200
