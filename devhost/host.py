"""`Host`: the devhost engine with its HTTP door, the way the Functions host serves an app.

The HTTP layer (devhost.http) depends on the engine; the engine knows nothing of HTTP. This
module is where the two meet.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .clock import Clock
from .engine import Engine
from .http import serve


class Host(Engine):
    def __init__(
        self,
        app_dir: str | Path,
        state_dir: str | Path,
        *,
        clock: str | Clock | None = "real",
        host: str = "127.0.0.1",
        port: int = 0,
        activity_workers: int | None = None,
        load_local_settings: bool = True,
    ) -> None:
        super().__init__(
            app_dir,
            state_dir,
            clock=clock,
            activity_workers=activity_workers,
            load_local_settings=load_local_settings,
        )
        self._bind = (host, port)
        self._server: Any = None

    def start(self) -> Host:
        super().start()
        return self

    def __enter__(self) -> Host:
        return self.start()

    def _open_doors(self) -> None:
        self._server = serve(self, *self._bind)
        address, port = self._server.server_address[:2]
        self.base_url = f"http://{address}:{port}"

    def _close_doors(self) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()
