"""Bulk throughput of one large transfer through a client+server tunnel pair: ours vs
stunnel4, alternating runs in one process, medians quoted. A first slice of the bench;
run: .venv/bin/python bench/bulk.py [--mb 512] [--rounds 3]."""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.helpers import client_doc, make_pki, server_doc, write_yaml  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} not ready")


class Sink:
    """A target that reads to EOF and then replies with the byte count."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            conn, _ = self.sock.accept()
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        buf = bytearray(1 << 20)
        total = 0
        with conn:
            while n := conn.recv_into(buf):
                total += n
            conn.sendall(str(total).encode())


def transfer(port: int, megabytes: int) -> float:
    chunk = os.urandom(1 << 20)
    with socket.create_connection(("127.0.0.1", port)) as s:
        start = time.perf_counter()
        for _ in range(megabytes):
            s.sendall(chunk)
        s.shutdown(socket.SHUT_WR)
        reply = s.recv(100)
        elapsed = time.perf_counter() - start
    assert int(reply) == megabytes << 20, reply
    return megabytes / elapsed


def start_ours(tmp: Path, pki, target: int) -> tuple[list[subprocess.Popen[bytes]], int]:
    sport, cport = free_port(), free_port()
    s = write_yaml(tmp / "s.yaml", server_doc(pki, f"127.0.0.1:{target}", listen=f"127.0.0.1:{sport}"))
    c = write_yaml(tmp / "c.yaml", client_doc(pki, f"127.0.0.1:{sport}", listen=f"127.0.0.1:{cport}"))
    tunnel = [sys.executable, "-m", "tunnel.cli", "run"]
    procs = [subprocess.Popen([*tunnel, str(p)], stderr=subprocess.DEVNULL) for p in (s, c)]
    wait_port(sport)
    wait_port(cport)
    return procs, cport


def start_stunnel(tmp: Path, pki, target: int) -> tuple[list[subprocess.Popen[bytes]], int]:
    sport, cport = free_port(), free_port()
    common = "foreground = yes\npid =\ndebug = 0\n"
    server = (
        f"{common}[s]\naccept = 127.0.0.1:{sport}\nconnect = 127.0.0.1:{target}\n"
        f"cert = {pki.crt('server')}\nkey = {pki.key('server')}\nCAfile = {pki.ca}\n"
        "verifyChain = yes\nrequireCert = yes\nsslVersionMin = TLSv1.3\n"
    )
    client = (
        f"{common}[c]\nclient = yes\naccept = 127.0.0.1:{cport}\nconnect = 127.0.0.1:{sport}\n"
        f"cert = {pki.crt('app1')}\nkey = {pki.key('app1')}\nCAfile = {pki.ca}\n"
        "verifyChain = yes\ncheckHost = localhost\nsslVersionMin = TLSv1.3\n"
    )
    procs = []
    for name, text in (("s.conf", server), ("c.conf", client)):
        (tmp / name).write_text(text)
        procs.append(subprocess.Popen(["stunnel4", str(tmp / name)], stderr=subprocess.DEVNULL))
    wait_port(sport)
    wait_port(cport)
    return procs, cport


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        pki = make_pki(tmp)
        sink = Sink()
        results: dict[str, list[float]] = {"tunnel": [], "stunnel4": []}
        starters = {"tunnel": start_ours, "stunnel4": start_stunnel}
        for _ in range(args.rounds):
            for name, start in starters.items():
                procs, port = start(tmp, pki, sink.port)
                try:
                    results[name].append(transfer(port, args.mb))
                finally:
                    for p in procs:
                        p.terminate()
                        p.wait()
        ours, theirs = (statistics.median(results[k]) for k in ("tunnel", "stunnel4"))
        print(f"bulk MB/s (median of {args.rounds}, {args.mb} MiB each)")
        print(f"  tunnel   {ours:8.1f}  {results['tunnel']}")
        print(f"  stunnel4 {theirs:8.1f}  {results['stunnel4']}")
        print(f"  ratio    {ours / theirs:8.2f}x")


if __name__ == "__main__":
    main()
