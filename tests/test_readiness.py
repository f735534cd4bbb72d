"""The suite's readiness waits (tests/readiness.py) against a local server that is slow or silent.

A real HTTP server in a child process: it accepts every connection at once and answers each request
only after a delay (on two busy cores moto_server's first answer took over the
old probe's 1 s). The wait must get through a server slower than 1 s, and when the server never
answers, fail by its deadline with one message that carries the server's log.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from conftest import free_port
from readiness import NotReady, wait_http

SERVER = """
import sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

delay = float(sys.argv[2])

class Slow(BaseHTTPRequestHandler):
    def do_GET(self):
        print(f"request {self.path}: answering in {delay}s", flush=True)
        time.sleep(delay)  # the connection is accepted; the answer is late (or, with a huge delay, never)
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass

print("slow server listening", flush=True)
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Slow).serve_forever()
"""


@pytest.fixture
def slow_server(tmp_path):
    """Start the server with a given answer delay; returns (url, process, log path)."""
    started: list[subprocess.Popen] = []

    def start(delay_s: float) -> tuple[str, subprocess.Popen, Path]:
        port, log = free_port(), tmp_path / f"server-{len(started)}.log"
        proc = subprocess.Popen(
            [sys.executable, "-c", SERVER, str(port), str(delay_s)], stdout=log.open("w"), stderr=subprocess.STDOUT
        )
        started.append(proc)
        return f"http://127.0.0.1:{port}/", proc, log

    yield start
    for proc in started:
        proc.kill()
        proc.wait(timeout=10)


def test_a_slow_first_answer_is_waited_for(slow_server):
    url, proc, log = slow_server(2.5)
    wait_http(url, "the slow server", deadline_s=60, logs=[log], process=proc)
    # The old probe (one try of 1 s, only connection errors retried) fails against the same server.
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.get(url, timeout=1)
    assert "answering in 2.5s" in log.read_text()


def test_a_server_that_never_answers_fails_by_the_deadline_with_its_log(slow_server):
    url, proc, log = slow_server(3600)
    t0 = time.monotonic()
    with pytest.raises(NotReady) as failure:
        wait_http(url, "the silent server", deadline_s=4, logs=[log], process=proc)
    elapsed = time.monotonic() - t0
    message = str(failure.value)
    assert 4 <= elapsed < 8, elapsed  # each try's timeout is cut to what is left of the deadline
    assert message.startswith("the silent server: not ready after 4s")
    assert "ReadTimeout" in message  # the last try's error
    assert "slow server listening" in message and "answering in 3600.0s" in message  # the server's log
    assert proc.poll() is None  # the wait does not stop what it waits on; the owner does


def test_a_server_that_exits_fails_at_once_with_its_log(tmp_path):
    log = tmp_path / "dead.log"
    proc = subprocess.Popen(
        [sys.executable, "-c", "print('cannot bind: port in use'); raise SystemExit(3)"],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    proc.wait(timeout=30)
    t0 = time.monotonic()
    with pytest.raises(NotReady, match="exited with 3") as failure:
        wait_http(f"http://127.0.0.1:{free_port()}/", "the dead server", deadline_s=60, logs=[log], process=proc)
    assert time.monotonic() - t0 < 5
    assert "cannot bind: port in use" in str(failure.value)
