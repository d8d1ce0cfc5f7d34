"""Real HTTP servers for the API tests: an app (taxon's own server, or a small FastAPI stand-in for
a misbehaving provider) under uvicorn on 127.0.0.1, on a free port, in a thread of the test."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

import yaml


@dataclass
class Running:
    server: object
    thread: threading.Thread
    port: int
    app: object

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def stop(self) -> None:
        self.server.should_exit = True  # type: ignore[attr-defined]
        self.thread.join(10)


def start(app) -> Running:
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("test server did not start")
        time.sleep(0.02)
    return Running(server, thread, port, app)


def endpoints_file(path, **entries) -> str:
    """Write a user endpoints file: name -> fields."""
    path.write_text(yaml.safe_dump(entries))
    return str(path)
