"""What the local backend's two servers (local_forkserver.py, local_kernelserver.py) share:
the key that says which build of the code a server holds, and their private socket's reads.

Standard library only: the function host imports it to find a server.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import struct
import sys
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parents[1]
PACKAGE_ROOT = str(_PACKAGE.parent)


def code_key(env: dict[str, str]) -> str:
    """Which server may fork for this caller: same interpreter, same code, same import path."""
    stamps = sorted(
        (str(p.relative_to(_PACKAGE)), p.stat().st_mtime_ns) for p in _PACKAGE.rglob("*.py")
    )
    material = json.dumps(
        [sys.executable, PACKAGE_ROOT, env.get("PYTHONPATH", ""), stamps], sort_keys=True
    )
    return hashlib.sha256(material.encode()).hexdigest()[:16]


def read_line(conn: socket.socket, limit: int = 1 << 20, data: bytes = b"") -> bytes:
    """One newline-ended message (`data`: what was received of it already)."""
    while not data.endswith(b"\n") and len(data) < limit:
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def listen(path: Path) -> socket.socket:
    """A listening socket at `path` that only this user can reach (mode 0600), replacing one
    a killed server left (the caller holds the server's lock); accept() times out each second
    so the server can look at its runs folder and idle time."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        listener.bind(str(path))
    finally:
        os.umask(old_umask)
    listener.listen(64)
    listener.settimeout(1.0)
    return listener
