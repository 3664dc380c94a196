"""The benchmark: our tunnel against stunnel4 (and nginx and HAProxy on the server side),
in alternating runs (ours, stunnel4, ..., ours, stunnel4, ...), medians quoted.

    make bench          # the full run; writes docs/benchmark.md, .png and .json
    make bench-smoke    # everything once with tiny sizes; writes build/bench/
    .venv-bench/bin/python bench/run.py [--quick] [--only NAME]... [--rounds N] [--out DIR]

Measures (names for --only): bulk, handshake, latency, memory, scale, redis, pgbench. See bench/README.md
for what each number means. Every process the run starts is stopped when it ends, however
it ends; the logs of all of them are kept in build/bench/logs/.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import pwd
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from peers import (  # noqa: E402
    EPOLL_FLOOR,
    NGINX_STREAM_MODULE,
    PAIR_PEERS,
    SERVER_PEERS,
    TRIO_FLOOR,
    TRIO_TLS_FLOOR,
    Proc,
    Processes,
    Setup,
    cpu_seconds,
    free_port,
    rss_kib,
    start_pair,
    start_server,
    tunnel_has_workers,
    wait_listening,
)
from report import Results, machine_info, write_report  # noqa: E402

from tests.helpers import make_pki  # noqa: E402

MEASURES = ("bulk", "handshake", "latency", "memory", "scale", "redis", "pgbench")
SCALE_PEERS = ("tunnel", "stunnel4")
# Descriptors every process the run starts may open: a server holding 10,000 relayed
# connections needs 20,000 and more (bench/run.py raises its own limit; children inherit it).
FILE_LIMIT = 65536
BUILD = ROOT / "build" / "bench"

# What the run needs from Debian: a command (or file) → the package that provides it.
SYSTEM_NEEDS = {
    "stunnel4": "stunnel4",
    "nginx": "nginx",
    str(NGINX_STREAM_MODULE): "libnginx-mod-stream",
    "haproxy": "haproxy",
    "redis-server": "redis-server",
    "redis-benchmark": "redis-tools",
    "/usr/lib/postgresql/*/bin/initdb": "postgresql",
    "pgbench": "postgresql-client",
    "gcc": "gcc",
    "/usr/include/openssl/ssl.h": "libssl-dev",
}


@dataclass(frozen=True)
class Settings:
    quick: bool
    rounds: int
    bulk_mib: int
    hs_seconds: float
    hs_conns: int
    latency_rounds: int
    latency_size: int
    hold: int
    redis_requests: int
    redis_clients: int
    pgbench_seconds: int
    pgbench_clients: int
    scale_total: int  # idle authenticated connections held by the scale measure
    scale_seconds: float  # each handshake-latency run of the scale measure

    @classmethod
    def make(cls, quick: bool, rounds: int | None) -> Settings:
        if quick:
            return cls(True, rounds or 1, 16, 0.5, 16, 300, 64, 50, 2000, 20, 2, 8, 300, 1.0)
        return cls(False, rounds or 5, 512, 6.0, 50, 5000, 64, 1000, 50000, 20, 8, 8, 10_000, 4.0)


# ----------------------------------------------------------------------------- setup


def find(command: str) -> str | None:
    if "*" in command:
        return max(glob.glob(command), default=None)
    if command.startswith("/"):
        return command if Path(command).exists() else None
    return shutil.which(command) or next(
        (f"{d}/{command}" for d in ("/usr/sbin", "/sbin") if Path(f"{d}/{command}").exists()), None
    )


def ensure_system_packages() -> None:
    """apt-get install whatever is missing (we may be root; otherwise say what to do)."""
    missing = sorted({pkg for need, pkg in SYSTEM_NEEDS.items() if find(need) is None})
    if not missing:
        return
    if os.geteuid() != 0:
        sys.exit(f"bench: missing {' '.join(missing)}: apt-get install {' '.join(missing)}")
    print(f"bench: installing {' '.join(missing)}", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], check=True, env=env)
    # Debian may start the packaged services; they are not used (everything here runs on
    # free ports) and no systemd usually runs in a container, so this is best effort.
    for service in ("nginx", "haproxy", "redis-server", "postgresql"):
        subprocess.run(["service", service, "stop"], capture_output=True, check=False)


def build_tools() -> dict[str, Path]:
    """Compile bench/*.c into build/bench/ (when the source is newer)."""
    BUILD.mkdir(parents=True, exist_ok=True)
    binaries = {}
    for name, libs in (("hsload", ["-lssl", "-lcrypto"]), ("echod", [])):
        src, exe = ROOT / "bench" / f"{name}.c", BUILD / name
        if not exe.exists() or exe.stat().st_mtime < src.stat().st_mtime:
            subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-o", str(exe), str(src), *libs], check=True)
        binaries[name] = exe
    return binaries


# ----------------------------------------------------------------------------- the run


@dataclass
class Bench:
    settings: Settings
    setup: Setup
    procs: Processes
    tools: dict[str, Path]
    results: Results
    workers: bool  # our tunnel takes --workers
    echo_port: int = 0
    once_port: int = 0  # echoes once, then closes: the target of the handshake runs
    sink_port: int = 0
    loadgen_cpu: int = field(default_factory=lambda: max(os.sched_getaffinity(0)))

    # -- helpers

    def start_targets(self) -> None:
        for mode, attr in (("echo", "echo_port"), ("once", "once_port"), ("sink", "sink_port")):
            argv = [str(self.tools["echod"]), *([] if mode == "echo" else [f"--{mode}"])]
            proc = self.procs.start(f"echod-{mode}", argv)
            port = 0
            deadline = time.monotonic() + 10
            while not port and time.monotonic() < deadline:
                text = proc.log.read_text().strip()
                port = int(text) if text.isdigit() else 0
                time.sleep(0.02)
            wait_listening(proc, port)
            setattr(self, attr, port)

    def tls_args(self) -> list[str]:
        p = self.setup.pki
        return ["--ca", str(p.ca), "--cert", str(p.crt("app1")), "--key", str(p.key("app1"))]

    def hsload(self, mode: str, port: int, *args: str, tls: bool = True, pin: bool = False) -> dict[str, Any]:
        argv = [str(self.tools["hsload"]), mode, "--port", str(port), *(self.tls_args() if tls else []), *args]
        proc = self.procs.start(
            f"hsload-{mode}", argv, stdout=subprocess.PIPE, cpu=self.loadgen_cpu if pin else None, ends=True
        )
        try:
            out, _ = proc.popen.communicate(timeout=600)
        finally:
            self.procs.stop(proc)
        if proc.popen.returncode != 0:
            raise RuntimeError(f"hsload {mode} failed ({proc.popen.returncode}):\n{proc.log_tail()}")
        result: dict[str, Any] = json.loads(out)
        return result

    def say(self, text: str) -> None:
        print(f"  {text}", flush=True)

    # -- 1. bulk

    def bulk(self, rnd: int) -> None:
        for peer in (*PAIR_PEERS, "direct"):
            pair = None if peer == "direct" else start_pair(self.procs, self.setup, peer, self.sink_port)
            try:
                port = self.sink_port if pair is None else pair.port
                r = self.hsload("bulk", port, "--mb", str(self.settings.bulk_mib), tls=False)
            finally:
                if pair is not None:
                    self.procs.stop(pair.client)
                    self.procs.stop(pair.server)
            self.results.add("bulk", peer, r["mib_per_s"])
            self.say(f"bulk {peer}: {r['mib_per_s']:.0f} MiB/s")

    # -- 2. handshakes

    def handshake(self, rnd: int) -> None:
        peers = ["tunnel", *(["tunnel-w2"] if self.workers else []), *SERVER_PEERS[1:]]
        for label in peers:
            peer, workers = ("tunnel", 2) if label == "tunnel-w2" else (label, 1)
            server = start_server(self.procs, self.setup, peer, self.once_port, workers=workers)
            try:
                for mode in ("full", "resumed"):
                    extra = ["--resume"] if mode == "resumed" else []
                    cpu0 = cpu_seconds(server.proc.pid)
                    r = self.hsload(
                        "handshake",
                        server.port,
                        "--duration",
                        str(self.settings.hs_seconds),
                        "--conns",
                        str(self.settings.hs_conns),
                        *extra,
                        pin=True,
                    )
                    cpu = cpu_seconds(server.proc.pid) - cpu0
                    done = max(r["completed"], 1)
                    key = f"hs_{mode}"
                    self.results.add(key, label, r["rate"])
                    self.results.add(f"{key}_server_ms", label, 1000 * cpu / (done + 1))
                    self.results.add(f"{key}_server_cores", label, cpu / r["seconds"])
                    self.results.add(f"{key}_loadgen_cores", label, r["cpu_s"] / r["seconds"])
                    self.results.add(f"{key}_resumed_pct", label, 100 * r["resumed"] / done)
                    self.results.add(f"{key}_errors", label, r["errors"] + r["timeouts"])
                    self.results.add(f"{key}_conn_p99_ms", label, r["conn_p99_ms"])
                    self.results.add(f"{key}_conn_max_ms", label, r["conn_max_ms"])
                    self.say(
                        f"{key} {label}: {r['rate']:.0f}/s, server {1000 * cpu / (done + 1):.2f} ms CPU each "
                        f"({cpu / r['seconds']:.2f} cores), load generator {r['cpu_s'] / r['seconds']:.2f} cores, "
                        f"resumed {r['resumed']}/{r['completed']}, errors {r['errors'] + r['timeouts']}, "
                        f"connection p50/p99/max {r['conn_p50_ms']:.0f}/{r['conn_p99_ms']:.0f}/"
                        f"{r['conn_max_ms']:.0f} ms"
                    )
            finally:
                self.procs.stop(server.proc)

    # -- 3. latency

    def latency(self, rnd: int) -> None:
        ping = ["--rounds", str(self.settings.latency_rounds), "--size", str(self.settings.latency_size)]
        for peer in (*PAIR_PEERS, TRIO_FLOOR, TRIO_TLS_FLOOR, EPOLL_FLOOR, "direct"):
            pair = None if peer == "direct" else start_pair(self.procs, self.setup, peer, self.echo_port)
            try:
                port = self.echo_port if pair is None else pair.port
                pids = [] if pair is None else [pair.client.pid, pair.server.pid]
                cpu0 = sum(cpu_seconds(pid) for pid in pids)
                r = self.hsload("pingpong", port, "--plain", *ping, tls=False)
                cpu = sum(cpu_seconds(pid) for pid in pids) - cpu0
            finally:
                if pair is not None:
                    self.procs.stop(pair.client)
                    self.procs.stop(pair.server)
            self.results.add("lat_pair_p50", peer, r["p50_us"])
            self.results.add("lat_pair_p99", peer, r["p99_us"])
            per_round = 1e6 * cpu / (self.settings.latency_rounds + 200)
            if pair is not None:
                self.results.add("lat_pair_cpu_us", peer, per_round)
            cpu_note = "" if pair is None else f", client+server CPU {per_round:.0f} us per round trip"
            self.say(f"latency pair {peer}: p50 {r['p50_us']:.0f} us, p99 {r['p99_us']:.0f} us{cpu_note}")
        for peer in SERVER_PEERS:
            server = start_server(self.procs, self.setup, peer, self.echo_port)
            try:
                cpu0 = cpu_seconds(server.proc.pid)
                r = self.hsload("pingpong", server.port, *ping)
                cpu = cpu_seconds(server.proc.pid) - cpu0
            finally:
                self.procs.stop(server.proc)
            per_round = 1e6 * cpu / (self.settings.latency_rounds + 200)
            self.results.add("lat_server_p50", peer, r["p50_us"])
            self.results.add("lat_server_p99", peer, r["p99_us"])
            self.results.add("lat_server_cpu_us", peer, per_round)
            self.say(
                f"latency server {peer}: p50 {r['p50_us']:.0f} us, p99 {r['p99_us']:.0f} us, "
                f"server CPU {per_round:.0f} us per round trip"
            )

    # -- 4. memory

    def hold(self, port: int, total: int) -> tuple[Proc, dict[str, Any]]:
        """Open `total` connections and keep them; `release` closes them."""
        argv = [str(self.tools["hsload"]), "hold", "--port", str(port), *self.tls_args()]
        argv += ["--total", str(total), "--conns", "50"]
        proc = self.procs.start(
            "hsload-hold", argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cpu=self.loadgen_cpu, ends=True
        )
        assert proc.popen.stdout is not None
        line = proc.popen.stdout.readline()
        if not line:
            self.procs.stop(proc)
            raise RuntimeError(f"hsload hold failed:\n{proc.log_tail()}")
        result: dict[str, Any] = json.loads(line)
        return proc, result

    def release(self, proc: Proc) -> None:
        assert proc.popen.stdin is not None
        proc.popen.stdin.close()
        proc.popen.wait(30)
        self.procs.stop(proc)

    def memory(self, rnd: int) -> None:
        for peer in SERVER_PEERS:
            server = start_server(self.procs, self.setup, peer, self.echo_port)
            try:
                # Warm up (lazy initialisation, first allocations) with a few connections.
                self.release(self.hold(server.port, 20)[0])
                time.sleep(1.0)
                idle = rss_kib(server.proc.pid)
                holder, r = self.hold(server.port, self.settings.hold)
                time.sleep(1.0)
                loaded = rss_kib(server.proc.pid)
                self.release(holder)
            finally:
                self.procs.stop(server.proc)
            if r["held"] != self.settings.hold:
                raise RuntimeError(f"memory {peer}: held only {r['held']} connections: {r}")
            per_conn = (loaded - idle) / r["held"]
            self.results.add("mem_per_conn_kib", peer, per_conn)
            self.results.add("mem_idle_mib", peer, idle / 1024)
            self.say(f"memory {peer}: idle {idle / 1024:.1f} MiB, {per_conn:.1f} KiB per connection")

    # -- 5. scale

    def handshake_latency(self, port: int) -> dict[str, Any] | None:
        """New clients one at a time (full handshake + 1-byte echo each): their latency;
        None when not even the first could connect (a server at its cap)."""
        seconds = str(self.settings.scale_seconds)
        try:
            return self.hsload("handshake", port, "--duration", seconds, "--conns", "1", pin=True)
        except RuntimeError as exc:
            self.say(f"scale: no new connection was served: {str(exc).splitlines()[-1]}")
            return None

    def scale(self, rnd: int) -> None:
        """Hold scale_total idle authenticated connections at a server: how many it took,
        the memory each costs, and the handshake latency of new clients while they are held
        against the same with none held (issue 18). Each held connection costs a server two
        descriptors: when the hard file limit (which only a process with CAP_SYS_RESOURCE
        can raise) is short of that, the tunnel runs --workers 2, each worker holding half."""
        total = self.settings.scale_total
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        fits = hard == resource.RLIM_INFINITY or hard >= 2 * total + 100
        tunnel_workers = 1 if fits or not self.workers else 2
        for peer in SCALE_PEERS:
            workers = tunnel_workers if peer == "tunnel" else 1
            server = start_server(self.procs, self.setup, peer, self.echo_port, workers=workers)
            holder = None
            try:
                self.release(self.hold(server.port, 20)[0])  # warm up, as for memory
                before = self.handshake_latency(server.port)
                time.sleep(1.0)
                idle = rss_kib(server.proc.pid)
                holder, r = self.hold(server.port, total)
                time.sleep(1.0)
                loaded = rss_kib(server.proc.pid)
                during = self.handshake_latency(server.port)
            finally:
                if holder is not None:
                    self.release(holder)
                self.procs.stop(server.proc)
            failed = total - r["held"]  # refused, reset or timed out (hsload hold starts each once)
            per_conn = (loaded - idle) / max(r["held"], 1)
            self.results.add("scale_held", peer, r["held"])
            self.results.add("scale_failed", peer, failed)
            self.results.add("scale_mem_per_conn_kib", peer, per_conn)
            self.results.add("scale_hold_s", peer, r["seconds"])
            self.results.add("scale_file_limit", peer, hard)
            self.results.add("scale_workers", peer, workers)
            for when, hs in (("none", before), ("held", during)):
                if hs is not None:
                    self.results.add(f"scale_hs_p50_{when}_ms", peer, hs["conn_p50_ms"])
                    self.results.add(f"scale_hs_p99_{when}_ms", peer, hs["conn_p99_ms"])
                    self.results.add(f"scale_hs_failed_{when}", peer, hs["errors"] + hs["timeouts"])

            def latency(hs: dict[str, Any] | None) -> str:
                return "none served" if hs is None else f"{hs['conn_p50_ms']:.2f}/{hs['conn_p99_ms']:.2f} ms"

            self.say(
                f"scale {server.name}: held {r['held']}/{total} in {r['seconds']:.0f} s, {failed} refused or "
                f"failed, {per_conn:.1f} KiB per connection; new handshakes p50/p99 {latency(before)} with "
                f"none held, {latency(during)} with {r['held']} held"
            )

    # -- 6. redis

    def redis(self, rnd: int, redis_port: int) -> None:
        for peer in (*PAIR_PEERS, TRIO_FLOOR, TRIO_TLS_FLOOR, EPOLL_FLOOR, "direct"):
            pair = None if peer == "direct" else start_pair(self.procs, self.setup, peer, redis_port)
            try:
                port = redis_port if pair is None else pair.port
                argv = ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-t", "get,set"]
                argv += ["-n", str(self.settings.redis_requests), "-c", str(self.settings.redis_clients), "-q"]
                out = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=True).stdout
            finally:
                if pair is not None:
                    self.procs.stop(pair.client)
                    self.procs.stop(pair.server)
            rates = {m[1]: float(m[2]) for m in re.finditer(r"(?m)^\s*(\w+): ([\d.]+) requests per second", out)}
            if set(rates) != {"SET", "GET"}:
                raise RuntimeError(f"redis-benchmark through {peer}: unexpected output {out!r}")
            self.results.add("redis_set", peer, rates["SET"])
            self.results.add("redis_get", peer, rates["GET"])
            self.say(f"redis {peer}: SET {rates['SET']:.0f}/s, GET {rates['GET']:.0f}/s")

    def start_redis(self) -> int:
        port = free_port()
        argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        argv += ["--dir", str(self.setup.dir), "--daemonize", "no"]
        wait_listening(self.procs.start("redis-server", argv), port)
        return port

    # -- 7. pgbench

    def pgbench(self, rnd: int, pg_port: int) -> None:
        """`pgbench -S` (select-only: one round trip per transaction) through a pair speaking
        PostgreSQL's SSLRequest (tunnel `protocol: postgres`, stunnel4 `protocol = pgsql`),
        the application in plaintext (sslmode=disable: stunnel's client does not answer an
        application's SSLRequest). Transactions per second, initial connections excluded."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")} | {"PGSSLMODE": "disable"}
        for peer in (*PAIR_PEERS, TRIO_FLOOR, TRIO_TLS_FLOOR, EPOLL_FLOOR, "direct"):
            pair = None if peer == "direct" else start_pair(self.procs, self.setup, peer, pg_port, protocol="postgres")
            try:
                port = pg_port if pair is None else pair.port
                argv = ["pgbench", "-h", "127.0.0.1", "-p", str(port), "-U", PG_USER, "-n", "-S"]
                argv += ["-T", str(self.settings.pgbench_seconds), "-c", str(self.settings.pgbench_clients)]
                argv += ["-j", "2", PG_DATABASE]
                done = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False, env=env)
            finally:
                if pair is not None:
                    self.procs.stop(pair.client)
                    self.procs.stop(pair.server)
            found = re.search(r"tps = ([\d.]+) \(without initial connection time\)", done.stdout)
            if done.returncode != 0 or found is None:
                raise RuntimeError(f"pgbench through {peer} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
            self.results.add("pgbench_tps", peer, float(found[1]))
            self.say(f"pgbench -S {peer}: {float(found[1]):.0f} tps")

    def start_postgres(self) -> int:
        """A throwaway PostgreSQL (initdb in the run's temporary directory; durability off),
        trusting 127.0.0.1, on a free port, with `pgbench -i -s 1` done. As root it runs as
        the `postgres` account (initdb and postgres refuse root), through setpriv(1), which
        execs: the process stopped is postgres itself."""
        home = self.setup.dir / "postgres"
        home.mkdir()
        as_user: list[str] = []
        if os.geteuid() == 0:
            account = pwd.getpwnam("postgres")
            self.setup.dir.chmod(0o711)  # postgres must reach its directory, not list ours
            os.chown(home, account.pw_uid, account.pw_gid)
            as_user = ["setpriv", f"--reuid={account.pw_uid}", f"--regid={account.pw_gid}", "--clear-groups"]
        data = home / "data"
        initdb = [postgres_program("initdb"), "-D", str(data), "-U", PG_USER, "-A", "trust", "-E", "UTF8"]
        init = subprocess.run(
            [*as_user, *initdb, "--locale=C", "--no-sync"], capture_output=True, text=True, check=False
        )
        if init.returncode != 0:
            raise RuntimeError(f"initdb failed ({init.returncode}):\n{init.stdout}{init.stderr}")
        port = free_port()
        argv = [*as_user, postgres_program("postgres"), "-D", str(data)]
        for setting in (
            f"port={port}",
            "listen_addresses=127.0.0.1",
            f"unix_socket_directories={home}",
            "fsync=off",
            "synchronous_commit=off",
            "full_page_writes=off",
            "max_connections=100",
        ):
            argv += ["-c", setting]
        server = self.procs.start("postgres", argv)
        deadline = time.monotonic() + 30
        ready = [postgres_program("pg_isready"), "-q", "-h", str(home), "-p", str(port), "-U", PG_USER]
        while subprocess.run(ready, check=False).returncode != 0:
            if server.popen.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"postgres did not start:\n{server.log_tail()}")
            time.sleep(0.1)
        local = ["-h", str(home), "-p", str(port), "-U", PG_USER]
        for argv in (["createdb", *local, PG_DATABASE], ["pgbench", *local, "-i", "-s", "1", "-q", PG_DATABASE]):
            done = subprocess.run(argv, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"{argv[0]} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
        return port


# PostgreSQL: the database user (initdb's superuser, trusted on 127.0.0.1) and database.
PG_USER, PG_DATABASE = "bench", "bench"


def raise_file_limit() -> None:
    """RLIMIT_NOFILE to FILE_LIMIT for this process and so for every one it starts (as root;
    otherwise the soft limit up to the hard one, and the scale measure may fall short)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, FILE_LIMIT), max(hard, FILE_LIMIT)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        print(f"bench: the file limit stays at {hard} (raising it needs CAP_SYS_RESOURCE)", flush=True)


def postgres_program(name: str) -> str:
    """Debian keeps PostgreSQL's programs in /usr/lib/postgresql/VERSION/bin (the newest)."""
    found = find(f"/usr/lib/postgresql/*/bin/{name}")
    if found is None:
        raise RuntimeError(f"{name}: not in /usr/lib/postgresql/*/bin (apt-get install postgresql)")
    return found


def run(args: argparse.Namespace) -> int:
    settings = Settings.make(args.quick, args.rounds)
    measures = args.only or list(MEASURES)
    full = not args.quick and not args.only
    out = Path(args.out) if args.out else (ROOT / "docs" if full else BUILD)
    ensure_system_packages()
    raise_file_limit()
    tools = build_tools()
    logs = BUILD / "logs"
    shutil.rmtree(logs, ignore_errors=True)
    started = time.monotonic()
    info = machine_info(ROOT)
    with tempfile.TemporaryDirectory(prefix="tunnel-bench-") as tmp_name:
        tmp = Path(tmp_name)
        procs = Processes(logs)
        try:
            setup = Setup(make_pki(tmp), tmp, sys.executable)
            workers = tunnel_has_workers(sys.executable)
            results = Results(settings=settings.__dict__, measures=list(measures), workers=workers)
            bench = Bench(settings, setup, procs, tools, results, workers)
            bench.start_targets()
            redis_port = bench.start_redis() if "redis" in measures else 0
            pg_port = bench.start_postgres() if "pgbench" in measures else 0
            print(
                f"bench: {', '.join(measures)}; {settings.rounds} round(s), alternating; "
                f"load generator pinned to CPU {bench.loadgen_cpu}; tunnel --workers: {'yes' if workers else 'no'}",
                flush=True,
            )
            for rnd in range(settings.rounds):
                print(f"round {rnd + 1}/{settings.rounds}", flush=True)
                for name in measures:
                    if name == "redis":
                        bench.redis(rnd, redis_port)
                    elif name == "pgbench":
                        bench.pgbench(rnd, pg_port)
                    else:
                        getattr(bench, name)(rnd)
        finally:
            procs.stop_all()
    info["duration_s"] = round(time.monotonic() - started, 1)
    info["loadavg_after"] = Path("/proc/loadavg").read_text().split()[:3]
    write_report(results, info, out)
    print(f"bench: done in {info['duration_s']} s; wrote {out}/benchmark.md, .png, .json")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one round (a smoke test)")
    parser.add_argument("--only", action="append", choices=MEASURES, help="run only this measure (repeatable)")
    parser.add_argument("--rounds", type=int, help="alternating rounds per measure (default 5; --quick: 1)")
    parser.add_argument("--out", help="where to write benchmark.md/.png/.json (default docs/ for a full run)")
    args = parser.parse_args()

    def stop(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, stop)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
