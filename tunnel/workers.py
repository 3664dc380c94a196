"""`tunnel run --workers N`: one supervisor, N worker processes sharing each TCP listener.

Python runs one core's worth of handshakes per process. With N workers every listen
address has N SO_REUSEPORT sockets, one per worker, and the kernel spreads new connections
across them. The supervisor does what there must be only one of:

* the listening sockets: it checks that no other process holds a port, binds each worker's
  sockets at once, and hands them down (inherited descriptors, named in TUNNEL_LISTEN_FDS);
  a worker that dies leaves its socket, and its backlog, to the one started after it, and
  an address the tunnels leave on reload is closed here too (a worker binds an address
  the configuration gains itself); a socket systemd passed (LISTEN_FDS) is handed to
  every worker as it is, one socket for all, and stays open when the tunnels leave it;
* readiness: each worker reports to the supervisor over the sd_notify protocol (a
  datagram socket of the supervisor's own, handed down as NOTIFY_SOCKET); the supervisor
  tells systemd READY=1 once all N are listening, and RELOADING=1 / READY=1 around reloads;
* signals and file changes: SIGHUP, or a change to a configuration file, is passed to
  every worker, which reloads exactly as a single process does; SIGTERM/SIGINT are passed
  on too, and the supervisor exits once every worker has drained;
* the status address: /healthz, /connections and /metrics gather every worker's answer
  (from a private unix socket each) into one;
* a worker that dies is started again;
* the master secret of the session-ticket keys (tunnel.ticket_keys): made once, in
  memory, and passed to each worker it starts through an inherited pipe, so that every
  worker, and a worker started again, resumes the sessions of every other.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import trio
from prometheus_client import CONTENT_TYPE_LATEST

from tunnel import http
from tunnel.config import Address, ConfigError, TunnelConfig, load_paths
from tunnel.control import ControlLoop
from tunnel.listener import HANDED_DOWN, bind_listener, handed_down
from tunnel.logs import event
from tunnel.metrics import merge_texts
from tunnel.notify import Notifier
from tunnel.status import NOT_FOUND, Responder, json_body
from tunnel.ticket_keys import pass_secret
from tunnel.upgrade import TakeOver
from tunnel.watch import DEFAULT_INTERVAL

log = logging.getLogger("tunnel")

RESTART_DELAY = 1.0
READY_TIMEOUT = 60.0


def check_listen_addresses(configs: Sequence[TunnelConfig], passed: Collection[Address] = ()) -> None:
    """Workers share TCP ports: a fixed port each, and no unix listeners; but any socket
    systemd passed (`passed`: the listen addresses it serves) is shared as it is."""
    for config in configs:
        if config.listen in passed:
            continue
        if config.listen.is_unix:
            raise ConfigError(config.source, "listen", "a unix socket cannot be shared by several workers")
        if config.listen.port == 0:
            raise ConfigError(config.source, "listen", "port 0 cannot be shared by several workers")


def check_ports_free(configs: Sequence[TunnelConfig], handed: Collection[Address] = ()) -> None:
    """SO_REUSEPORT would let workers share a port with some other process: make sure no
    one else holds it first (OSError naming the tunnel otherwise). `handed`: addresses
    whose sockets an upgraded supervisor handed over (held by us, not checked)."""
    for config in configs:
        if config.listen in handed:
            continue
        family = socket.AF_INET6 if ":" in config.listen.host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((config.listen.host, config.listen.port))
            except OSError as exc:
                raise OSError(
                    exc.errno, f"tunnel {config.name}: cannot listen on {config.listen}: {exc.strerror or exc}"
                ) from exc


class Supervisor(ControlLoop):
    """The worker processes of one `tunnel run --workers N` (see the module docstring)."""

    counted = "workers"
    stopping_note = "passing it to every worker"
    closing_note = "passing it to every worker, which closes every connection now"

    def __init__(
        self,
        paths: Sequence[Path],
        configs: Sequence[TunnelConfig],
        *,
        workers: int,
        log_format: str = "text",
        status: Sequence[Address] = (),
        watch_interval: float = DEFAULT_INTERVAL,
        notifier: Notifier | None = None,
        passed: Mapping[Address, socket.socket] | None = None,
        takeover: TakeOver | None = None,
        pidfile: Path | None = None,
    ) -> None:
        """`passed`: the sockets systemd passed (tunnel/activation.py), by the listen
        address they serve: every worker gets the same one, and it stays open (for a later
        reload) when the tunnels leave it. `takeover`: the sockets of the supervisor this
        one upgrades (tunnel/upgrade.py): worker i gets the i-th socket handed for each
        address, so the kernel's SO_REUSEPORT group stays the same."""
        super().__init__(
            paths,
            status=status,
            status_configs=configs,
            watch_interval=watch_interval,
            notifier=notifier,
            takeover=takeover,
            pidfile=pidfile,
        )
        self.count = workers
        self.log_format = log_format
        self.configs = list(configs)
        self._dir = Path(tempfile.mkdtemp(prefix="tunnel-workers-"))
        self._notify: trio.socket.SocketType | None = None
        self._processes: dict[int, trio.Process] = {}
        self._ready = 0
        self._ready_changed = trio.Event()
        # Each worker's listening sockets, bound here and handed down: one owner, no
        # check-then-bind between processes, and a worker that dies leaves its socket
        # (its backlog) in place for the one started after it.
        self._sockets: dict[int, dict[Address, socket.socket]] = {}
        self._passed = dict(passed or {})

    # -- lifecycle -------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the workers until they have all stopped (tunnel/control.py); then remove the
        private directory of notify and status sockets."""
        try:
            await super().run(task_status=task_status)
        finally:
            self._close_sockets(lambda address: True)
            if self._notify is not None:
                self._notify.close()
            shutil.rmtree(self._dir, ignore_errors=True)

    # -- the control loop's parts (tunnel/control.py) --------------------------------

    def _configs(self) -> list[TunnelConfig]:
        return self.configs

    def _responder(self) -> Responder:
        return self.respond

    def _prepare(self) -> None:
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(self._dir / "notify.sock"))
        self._notify = trio.socket.from_stdlib_socket(notify)
        handed = self.takeover.by_address() if self.takeover is not None else {}
        try:
            for index in range(self.count):
                self._sockets[index] = {}
                for config in self.configs:
                    if config.listen in self._passed:  # systemd's: the same socket for every worker
                        self._sockets[index][config.listen] = self._passed[config.listen]
                    elif config.listen not in self._sockets[index]:  # tunnels sharing it (sni): one socket
                        if handed.get(config.listen):  # the upgraded supervisor's worker `index`'s
                            self._sockets[index][config.listen] = handed[config.listen].pop(0)
                        else:
                            self._sockets[index][config.listen] = bind_listener(config.listen, reuse_port=True)
                for address, sock in self._passed.items():  # systemd's, even with no tunnel on it now
                    self._sockets[index].setdefault(address, sock)  # (a later reload serves it again)
        except OSError as exc:
            self._close_sockets(lambda address: True)
            raise OSError(exc.errno, f"cannot listen for the workers: {exc.strerror or exc}") from exc
        finally:
            serving = {id(sock) for sock in self._passed.values()}
            for rest in handed.values():  # fewer workers, or an address no longer configured
                for sock in rest:
                    if id(sock) not in serving:  # a socket systemd passed is one object for all
                        sock.close()

    def _close_sockets(self, which: Callable[[Address], bool]) -> None:
        """Close the handed-down sockets of the addresses `which` picks (all of them at the
        end; on reload, those no tunnel listens on any more)."""
        for sockets in self._sockets.values():
            for address in [a for a in sockets if which(a)]:
                sockets.pop(address).close()

    async def _start(self, serving: trio.Nursery, helpers: trio.Nursery) -> dict[str, Any]:
        """Start every worker; return once all report ready (or READY_TIMEOUT passed)."""
        assert self._notify is not None
        helpers.start_soon(self._read_notifications, self._notify)
        for index in range(self.count):
            serving.start_soon(self._keep_running, index)
        await self._wait_ready(self.count)
        return {}

    def _count(self) -> int:
        return self.count

    def _stop(self, signum: int) -> None:
        self._begin_stopping()
        self._send_all(signum)

    def _close_all(self, signum: int) -> None:
        self._send_all(signum)

    def _listening(self) -> list[tuple[Address, socket.socket]]:
        """Every worker's sockets, worker 0's first: the new supervisor's worker i gets
        the sockets worker i has now."""
        return [(address, sock) for index in sorted(self._sockets) for address, sock in self._sockets[index].items()]

    def _kept(self) -> set[Address]:
        return set(self._passed)

    def _handed_over(self) -> None:
        """The new supervisor's workers accept on the same sockets: these workers drain."""
        self._begin_stopping(notify=False)
        self._send_all(signal.SIGTERM)

    def _worker_command(self, index: int) -> list[str]:
        return [
            sys.executable,
            "-m",
            "tunnel.cli",
            "run",
            f"--worker={index}",
            f"--worker-status={self._status_path(index)}",
            f"--log-format={self.log_format}",
            "--watch-interval=0",
            *(str(p) for p in self.paths),
        ]

    def _status_path(self, index: int) -> Path:
        return self._dir / f"worker-{index}.sock"

    async def _keep_running(self, index: int) -> None:
        """Run worker `index`; start it again if it dies while the daemon is not stopping."""
        env = {**os.environ, "NOTIFY_SOCKET": str(self._dir / "notify.sock"), "TUNNEL_WORKER": str(index)}
        while True:
            sockets = self._sockets.get(index, {})
            env[HANDED_DOWN] = handed_down(sockets, kept=self._passed)
            secret = pass_secret()  # the session tickets' master secret, through a pipe
            # A session of its own: a terminal's Ctrl-C reaches the supervisor only, which
            # passes it on once (a worker would count a second copy as "close everything now").
            try:
                process = await trio.lowlevel.open_process(
                    self._worker_command(index),
                    env={**env, **secret.env},
                    start_new_session=True,
                    pass_fds=[*(sock.fileno() for sock in sockets.values()), secret.fd],
                )
            finally:
                secret.close()
            self._processes[index] = process
            try:
                code = await process.wait()
            finally:
                if process.returncode is None:  # cancelled: do not leave it behind
                    process.kill()
                    await process.wait()
            if self._stopping:
                if code != 0:
                    event(
                        logging.ERROR, "worker_exited", "worker %d exited with %d", index, code, worker=index, code=code
                    )
                return
            event(
                logging.ERROR,
                "worker_exited",
                "worker %d exited with %d; starting it again",
                index,
                code,
                worker=index,
                code=code,
            )
            await trio.sleep(RESTART_DELAY)
            if self._stopping:  # the stop came while we waited: it would never reach a new one
                return

    async def _read_notifications(self, sock: trio.socket.SocketType) -> None:
        while True:
            data = await sock.recv(4096)
            if b"READY=1" in data.split(b"\n"):
                self._ready += 1
                self._ready_changed.set()
                self._ready_changed = trio.Event()

    async def _wait_ready(self, count: int) -> None:
        with trio.move_on_after(READY_TIMEOUT) as scope:
            while self._ready < count:
                await self._ready_changed.wait()
        if scope.cancelled_caught:
            event(logging.ERROR, "workers_not_ready", "only %d of %d workers reported ready", self._ready, count)

    # -- signals and reload ----------------------------------------------------------

    def _send_all(self, signum: int) -> None:
        for process in self._processes.values():
            if process.returncode is None:
                process.send_signal(signum)

    async def reload(self) -> None:
        """Pass the reload on to every worker (each reports a bad file itself), and wait
        until all report ready again."""
        if self._stopping:
            return
        with contextlib.suppress(ConfigError):  # the workers report a bad file themselves
            self.configs = load_paths(self.paths)  # what to watch from now on
            # An address no tunnel listens on any more must not stay bound here, where
            # nobody accepts: the workers bind new addresses themselves.
            listening = {config.listen for config in self.configs}
            self._close_sockets(lambda address: address not in listening and address not in self._passed)
        await self._announced(self._reload_workers)

    async def _reload_workers(self) -> None:
        self._ready = 0
        self._send_all(signal.SIGHUP)
        await self._wait_ready(len(self._processes))

    # -- the status address ----------------------------------------------------------

    async def respond(self, path: str) -> tuple[str, str, bytes]:
        if path not in ("/healthz", "/metrics", "/connections"):
            return "404 Not Found", "text/plain", NOT_FOUND
        answers = [await self._ask(index, path) for index in range(self.count)]
        try:
            return self._merge(path, answers)
        except (ValueError, KeyError, TypeError):  # a worker's answer was cut short (it died answering)
            return "503 Service Unavailable", "text/plain", b"a worker did not answer in full\n"

    def _merge(self, path: str, answers: list[tuple[int, bytes]]) -> tuple[str, str, bytes]:
        if path == "/metrics":
            return "200 OK", CONTENT_TYPE_LATEST, merge_texts([body.decode() for _, body in answers if body])
        if path == "/connections":
            rows = []
            for index, (_, body) in enumerate(answers):
                for row in json.loads(body)["connections"] if body else []:
                    rows.append({**row, "worker": index})
            return "200 OK", "application/json", json_body({"connections": rows})
        ok = all(code == 200 for code, _ in answers)
        tunnels: dict[str, str] = {}
        reload = None
        for _, body in answers:
            worker_doc = json.loads(body) if body else {}
            for name, state in worker_doc.get("tunnels", {}).items():
                tunnels[name] = state if tunnels.get(name, "listening") == "listening" else tunnels[name]
            reload = reload or worker_doc.get("reload")
        doc = {"status": "ok" if ok else "unavailable", "tunnels": tunnels, "workers": self.count}
        if reload:
            doc["reload"] = reload
        return ("200 OK" if ok else "503 Service Unavailable"), "application/json", json_body(doc)

    async def _ask(self, index: int, path: str) -> tuple[int, bytes]:
        """GET `path` from one worker's private status socket: (HTTP status, body); (503,
        b"") if the worker gives no whole answer within 5 seconds."""
        try:
            response = await http.fetch(Address(path=str(self._status_path(index))), path, within=5)
        except http.NoAnswer:
            return 503, b""
        return response.status, response.body
