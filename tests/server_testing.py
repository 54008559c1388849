"""A real uvicorn server on loopback for the service and dashboard tests."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

# Generous: uvicorn starts in well under a second on an idle machine, but far slower when the
# 2 cores are shared with other jobs.
START_TIMEOUT_S = 60


class ServerThread:
    """A real uvicorn server on 127.0.0.1 and a free port, run in a thread of the test process."""

    def __init__(self, app) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start within {START_TIMEOUT_S} s")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc_info) -> None:
        self.server.should_exit = True
        self.thread.join(START_TIMEOUT_S)
        self.sock.close()
