"""What the loopback servers share: a free port, a ``with`` block, a child stopped in time.

Each harness (:class:`LoopbackS3`, :class:`LoopbackGCS`, :class:`LoopbackPostgres`,
:class:`LocalCluster`) starts a real server on ``127.0.0.1``; a test must never
leave one running, so the ``with`` form that always stops it lives here once.
"""

from __future__ import annotations

import signal
import socket
import subprocess
from typing import Self


def free_port() -> int:
    """A TCP port on ``127.0.0.1`` that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def stop_child(
    process: subprocess.Popen[bytes], *, first: signal.Signals = signal.SIGTERM, timeout_s: float
) -> None:
    """Send ``first`` to a running child, wait ``timeout_s``, then SIGKILL it; always reaped."""
    if process.poll() is None:
        process.send_signal(first)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
    process.wait()


class LoopbackServer:
    """``with Server() as server:`` starts the server and stops it whatever happens."""

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
