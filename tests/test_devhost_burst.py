"""A burst of deliveries: 100 connections opened at the same moment on loopback, the way 100
pipelines' messages reach `serve` at once. Every one must be answered, and every message must
start its instance exactly once. With Python's default listen backlog of 5 the accept queue
overflowed and most connections hung (or were reset) until their timeout."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from devhost import Host
from devhost.events import EXECUTION_STARTED
from tests.devhost_support import APPS

BURST = 100


def _deliver(base_url: str, index: int, barrier: threading.Barrier) -> list[int]:
    """Open the connection when every other thread is ready, then send the message twice on
    it (a redelivery must not start a second instance). Returns the two status codes."""
    host, port = base_url.removeprefix("http://").split(":")
    body = json.dumps(
        {
            "input": json.dumps({"n": index}),
            "applicationProperties": {"InstanceId": f"burst-{index}"},
        }
    ).encode()
    request = (
        f"POST /admin/functions/queue_start HTTP/1.1\r\nHost: {host}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    barrier.wait(timeout=60)
    codes = []
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        reader = sock.makefile("rb")
        for _ in range(2):
            sock.sendall(request)
            status_line = reader.readline()
            length = 0
            while (line := reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            reader.read(length)
            codes.append(int(status_line.split()[1]))
    return codes


def test_a_hundred_simultaneous_deliveries_are_each_answered_and_started_once(tmp_path):
    with Host(APPS / "burst", tmp_path / "state") as host:
        barrier = threading.Barrier(BURST)
        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=BURST) as pool:
            futures = [pool.submit(_deliver, host.base_url, i, barrier) for i in range(BURST)]
            codes = [f.result(timeout=180) for f in futures]
        answered = time.monotonic() - started
        outputs = {i: host.wait_for(f"burst-{i}", 120)["output"] for i in range(BURST)}
        instances = host.query(None, None, None, "burst-")
        starts = {
            i.instance_id: sum(
                e["EventType"] == EXECUTION_STARTED for e in host.history(i.instance_id)
            )
            for i in instances
        }
    assert codes == [[202, 202]] * BURST
    assert outputs == {i: {"n": i, "stamped": True} for i in range(BURST)}
    assert len(instances) == BURST and set(starts.values()) == {1}
    print(f"{BURST} simultaneous deliveries answered in {answered:.2f} s")
