"""Tell systemd (or anything listening on $NOTIFY_SOCKET) how the daemon is doing.

The sd_notify protocol: one datagram per state change ("READY=1", "RELOADING=1",
"STOPPING=1", "STATUS=..."), sent to the unix socket named by NOTIFY_SOCKET (a leading
"@" means the abstract namespace). Without NOTIFY_SOCKET every call does nothing, so the
daemon runs the same with or without systemd.
"""

from __future__ import annotations

import logging
import os
import socket
import time


class Notifier:
    def __init__(self, address: str | None = None) -> None:
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET")
        self.address = ("\0" + address[1:] if address.startswith("@") else address) if address else None
        self._warned = False

    def send(self, *lines: str) -> None:
        """Send one notification; failures are ignored (the service manager may be gone)."""
        if not self.address:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.connect(self.address)
                sock.sendall("\n".join(lines).encode())
        except OSError as exc:
            if not self._warned:  # once: otherwise systemd just times the start out, unexplained
                self._warned = True
                logging.getLogger("tunnel").warning("cannot notify the service manager at NOTIFY_SOCKET: %s", exc)

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def reloading(self) -> None:
        # MONOTONIC_USEC lets Type=notify-reload match this message to its SIGHUP.
        self.send("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=draining connections")
