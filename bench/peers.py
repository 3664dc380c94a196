"""The processes a benchmark run starts, and the configuration of every peer compared.

Every peer is set up the same way: mutual TLS, TLS 1.3 only, the ECDSA P-256 test CA from
`tests.helpers.make_pki` (server certificate `server` for localhost/127.0.0.1, client
certificate `app1`), the client certificate required and verified against that CA, the
server verified by the client against the CA and the name `localhost`, one log line (or a
few) per connection written to a file, listening on 127.0.0.1 in front of the same target.

* `tunnel` (ours): `python -m tunnel.cli run FILE.yaml`, one process (or `--workers N`).
* `stunnel4`: one process, one thread per connection (its default), default log level.
* `nginx`: the stream module, 2 worker processes (one per core here), `reuseport`.
* `haproxy`: `mode tcp`, its default of one thread per core, `option tcplog`.

`Processes` starts each one in a session of its own and always stops what it started.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from tests.helpers import PKI, client_doc, server_doc, write_yaml

LOCALHOST = "127.0.0.1"
NGINX_STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOCALHOST, 0))
        port: int = s.getsockname()[1]
        return port


class StartError(RuntimeError):
    """A process died or never listened."""


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    expect_running: bool = True  # False for a process that ends by itself (a load generator)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])


@dataclass
class Processes:
    """Everything started during a run, so that `stop_all` can always clean up."""

    logs: Path
    running: list[Proc] = field(default_factory=list)
    _count: int = 0

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        stdin: int | IO[bytes] | None = subprocess.DEVNULL,
        stdout: int | None = None,
        cpu: int | None = None,
        cwd: Path | None = None,
        ends: bool = False,
    ) -> Proc:
        """Start `argv` in a new session (so its own children can be found and stopped);
        stderr (and stdout unless given) go to a log file; `cpu` pins it to one CPU; `ends`:
        it exits by itself (otherwise `stop` warns when it finds it already gone)."""
        self.logs.mkdir(parents=True, exist_ok=True)
        self._count += 1
        log = self.logs / f"{self._count:03d}-{name}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(
                list(argv),
                stdin=stdin,
                stdout=out if stdout is None else stdout,
                stderr=out,
                start_new_session=True,
                cwd=cwd,
                preexec_fn=(lambda: os.sched_setaffinity(0, {cpu})) if cpu is not None else None,
            )
        proc = Proc(name, popen, log, expect_running=not ends)
        self.running.append(proc)
        return proc

    def stop(self, proc: Proc, timeout: float = 10) -> None:
        """SIGTERM, then SIGKILL to its process group (which only it and its children are in)."""
        code = proc.popen.poll()
        if code is not None and proc.expect_running:
            print(f"bench: warning: {proc.name} ({proc.pid}) had exited by itself ({code})", file=sys.stderr)
        if code is None:
            with contextlib.suppress(ProcessLookupError):
                proc.popen.send_signal(signal.SIGTERM)
            try:
                proc.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                print(f"bench: {proc.name} ({proc.pid}) ignored SIGTERM; killing it", file=sys.stderr)
        # Children left behind (e.g. nginx workers whose master was killed) are in its group.
        for pid in process_group(proc.pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(5)
        if proc in self.running:
            self.running.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.running)):
            self.stop(proc)


def wait_listening(proc: Proc, port: int, timeout: float = 20) -> None:
    """Until something accepts on 127.0.0.1:port; StartError if `proc` dies first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise StartError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log_tail()}")
        try:
            socket.create_connection((LOCALHOST, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise StartError(f"{proc.name} is not listening on {port} after {timeout}s:\n{proc.log_tail()}")


# ----------------------------------------------------------------------------- /proc


def _stats() -> dict[int, list[str]]:
    """/proc/PID/stat of every process, the fields after the command name."""
    stats = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stats[int(entry)] = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
    return stats


def process_group(pgid: int) -> list[int]:
    """The processes still in process group `pgid`."""
    return [pid for pid, fields in _stats().items() if int(fields[2]) == pgid]


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants (nginx workers, tunnel worker processes)."""
    children: dict[int, list[int]] = {}
    for pid, fields in _stats().items():
        children.setdefault(int(fields[1]), []).append(pid)
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def cpu_seconds(root: int) -> float:
    """User + system CPU time of `root` and its descendants (all their threads)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in process_tree(root):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks


def rss_kib(root: int) -> int:
    """Resident set size of `root` and its descendants, summed (KiB)."""
    total = 0
    for pid in process_tree(root):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


# ----------------------------------------------------------------------------- peers


@dataclass(frozen=True)
class Setup:
    """What every peer's configuration needs."""

    pki: PKI
    dir: Path  # where configuration files go
    python: str  # the interpreter that runs our tunnel


@dataclass
class Server:
    """A running server-side peer: TLS on `port`, plaintext to the target."""

    name: str
    proc: Proc
    port: int


@dataclass
class Pair:
    """A running client+server pair: plaintext in on `port`, TLS between them."""

    name: str
    client: Proc
    server: Proc
    port: int


SERVER_PEERS = ("tunnel", "stunnel4", "nginx", "haproxy")
PAIR_PEERS = ("tunnel", "stunnel4")
# For reference only (latency and redis): two bare trio forwarders, no TLS. See trio_forward.py.
TRIO_FLOOR = "trio-floor"
EPOLL_FLOOR = "epoll-floor"  # the same without trio: one select.epoll loop in plain CPython
TRIO_TLS_FLOOR = "trio-tls-floor"  # trio's floor with mutual TLS between the two: a TLS tunnel's floor
FLOORS = {TRIO_FLOOR: "trio_forward.py", TRIO_TLS_FLOOR: "trio_forward.py", EPOLL_FLOOR: "epoll_forward.py"}


def start_server(
    procs: Processes, setup: Setup, peer: str, target: int, *, workers: int = 1, protocol: str = "tcp"
) -> Server:
    """`protocol` "postgres": PostgreSQL's SSLRequest before the TLS (tunnel: `protocol:
    postgres`, stunnel4: `protocol = pgsql`); only those two speak it."""
    port = free_port()
    if peer == "tunnel":
        argv = _tunnel_server(setup, port, target, workers, protocol)
    elif peer == "stunnel4":
        argv = _stunnel_server(setup, port, target, workers, protocol)
    elif protocol != "tcp":
        raise ValueError(f"{peer} does not speak protocol {protocol}")
    else:
        argv = {"nginx": _nginx, "haproxy": _haproxy}[peer](setup, port, target, workers)
    label = peer if workers == 1 else f"{peer}-w{workers}"
    proc = procs.start(f"{label}-server", argv)
    wait_listening(proc, port)
    return Server(label, proc, port)


def start_pair(procs: Processes, setup: Setup, peer: str, target: int, *, protocol: str = "tcp") -> Pair:
    """A client+server pair in front of `target`; `protocol` as for `start_server` (the
    trio floor relays bytes whatever they are)."""
    if peer in FLOORS:
        return _floor_pair(procs, setup, target, peer)
    server = start_server(procs, setup, peer, target, protocol=protocol)
    port = free_port()
    if peer == "tunnel":
        argv = _tunnel_client(setup, port, server.port, protocol)
    elif peer == "stunnel4":
        argv = _stunnel_client(setup, port, server.port, protocol)
    else:
        raise ValueError(f"no client side for {peer}")
    client = procs.start(f"{peer}-client", argv)
    wait_listening(client, port)
    return Pair(peer, client, server.proc, port)


def _floor_pair(procs: Processes, setup: Setup, target: int, peer: str) -> Pair:
    """Two bare forwarders, plain TCP: trio's (bench/trio_forward.py), the event loop's
    floor, or plain CPython's on select.epoll (bench/epoll_forward.py); trio's with mutual
    TLS between the two (the same certificates as the tunnels'), a TLS tunnel's floor."""
    script = str(Path(__file__).resolve().parent / FLOORS[peer])
    p = setup.pki
    tls_server = [str(p.crt("server")), str(p.key("server")), str(p.ca)]
    tls_client = [str(p.crt("app1")), str(p.key("app1")), str(p.ca)]
    tls = peer == TRIO_TLS_FLOOR
    server_port, client_port = free_port(), free_port()
    argv = [setup.python, script, str(server_port), str(target), *(["--tls-server", *tls_server] if tls else [])]
    server = procs.start(f"{peer}-server", argv)
    wait_listening(server, server_port)
    argv = [setup.python, script, str(client_port), str(server_port), *(["--tls-client", *tls_client] if tls else [])]
    client = procs.start(f"{peer}-client", argv)
    wait_listening(client, client_port)
    return Pair(peer, client, server, client_port)


def tunnel_has_workers(python: str) -> bool:
    """Whether `tunnel run` takes --workers (N processes sharing each listener)."""
    out = subprocess.run(
        [python, "-m", "tunnel.cli", "run", "--help"], capture_output=True, text=True, check=False, timeout=60
    )
    return "--workers" in out.stdout


# The same connection cap for every peer, above the scale measure's 10,000 held connections:
# tunnel `limits.max_connections`, nginx `worker_connections` (which counts the upstream side
# too), HAProxy `maxconn`; stunnel4 has no such setting (its cap follows the file limit,
# which bench/run.py raises for every process it starts).
CONNECTION_CAP = 12_000


def _file_limit() -> int:
    """The hard RLIMIT_NOFILE every process started here inherits (raised by bench/run.py
    where it may be)."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return 1 << 20 if hard == resource.RLIM_INFINITY else hard


def _cap_within_file_limit() -> int:
    """CONNECTION_CAP, or what fits two descriptors per connection under the file limit
    (HAProxy refuses to start with a maxconn it cannot hold; the others lower or warn)."""
    return min(CONNECTION_CAP, (_file_limit() - 100) // 2)


# Our tunnel: generous limits so that they never throttle the benchmark, a short drain.
_TUNNEL_LIMITS = {
    "handshake_timeout": "10s",
    "connect_timeout": "5s",
    "max_connections": CONNECTION_CAP,
    "max_handshakes": 4096,
    "per_source": {"handshakes": 4096, "connections": CONNECTION_CAP},  # every load generator is one source
    "drain_timeout": "1s",
}


def _tunnel_server(setup: Setup, port: int, target: int, workers: int, protocol: str = "tcp") -> list[str]:
    doc = server_doc(setup.pki, f"{LOCALHOST}:{target}", listen=f"{LOCALHOST}:{port}", limits=_TUNNEL_LIMITS)
    doc["tls"]["min_version"] = "1.3"
    doc["protocol"] = protocol
    path = write_yaml(setup.dir / f"tunnel-server-{port}.yaml", doc)
    argv = [setup.python, "-m", "tunnel.cli", "run", str(path)]
    return argv if workers == 1 else [*argv, "--workers", str(workers)]


def _tunnel_client(setup: Setup, port: int, server: int, protocol: str = "tcp") -> list[str]:
    doc = client_doc(setup.pki, f"{LOCALHOST}:{server}", listen=f"{LOCALHOST}:{port}", limits=_TUNNEL_LIMITS)
    doc["tls"]["min_version"] = "1.3"
    doc["protocol"] = protocol
    path = write_yaml(setup.dir / f"tunnel-client-{port}.yaml", doc)
    return [setup.python, "-m", "tunnel.cli", "run", str(path)]


# stunnel4: foreground, logging to stderr (a file) at its default level (5, notice), which
# logs each connection, as our tunnel does.
_STUNNEL_GLOBAL = "foreground = yes\npid =\nsyslog = no\n"


def _stunnel_protocol(protocol: str) -> str:
    """stunnel's `protocol = pgsql` (both sides: stunnel(8), "protocol"): the client sends
    SSLRequest, the server answers it. stunnel's client does not answer the application's
    own SSLRequest, so the application must not send one (libpq: sslmode=disable)."""
    return {"tcp": "", "postgres": "protocol = pgsql\n"}[protocol]


def _stunnel_server(setup: Setup, port: int, target: int, workers: int, protocol: str = "tcp") -> list[str]:
    if workers != 1:
        raise ValueError("stunnel4 has no worker processes")
    p = setup.pki
    text = (
        f"{_STUNNEL_GLOBAL}[server]\naccept = {LOCALHOST}:{port}\nconnect = {LOCALHOST}:{target}\n"
        f"cert = {p.crt('server')}\nkey = {p.key('server')}\nCAfile = {p.ca}\n"
        "verifyChain = yes\nrequireCert = yes\nsslVersionMin = TLSv1.3\n" + _stunnel_protocol(protocol)
    )
    path = setup.dir / f"stunnel-server-{port}.conf"
    path.write_text(text)
    return ["stunnel4", str(path)]


def _stunnel_client(setup: Setup, port: int, server: int, protocol: str = "tcp") -> list[str]:
    p = setup.pki
    text = (
        f"{_STUNNEL_GLOBAL}[client]\nclient = yes\naccept = {LOCALHOST}:{port}\nconnect = {LOCALHOST}:{server}\n"
        f"cert = {p.crt('app1')}\nkey = {p.key('app1')}\nCAfile = {p.ca}\n"
        "verifyChain = yes\ncheckHost = localhost\nsni = localhost\nsslVersionMin = TLSv1.3\n"
        + _stunnel_protocol(protocol)
    )
    path = setup.dir / f"stunnel-client-{port}.conf"
    path.write_text(text)
    return ["stunnel4", str(path)]


def _nginx(setup: Setup, port: int, target: int, workers: int) -> list[str]:
    if workers != 1:
        raise ValueError("nginx always runs its 2 workers here")
    p, d = setup.pki, setup.dir
    user = "user nobody nogroup;\n" if os.geteuid() == 0 else ""
    text = f"""\
load_module {NGINX_STREAM_MODULE};
{user}worker_processes 2;
worker_rlimit_nofile {min(4 * CONNECTION_CAP, _file_limit())};
daemon off;
pid {d}/nginx-{port}.pid;
error_log stderr warn;
events {{ worker_connections {2 * CONNECTION_CAP}; }}
stream {{
    log_format conn '$remote_addr:$remote_port [$time_local] $status $bytes_received $bytes_sent '
                    '$session_time "$ssl_client_s_dn" $ssl_session_reused';
    access_log {d}/nginx-{port}-access.log conn;
    server {{
        listen {LOCALHOST}:{port} ssl reuseport;
        proxy_pass {LOCALHOST}:{target};
        proxy_timeout 1h;
        ssl_certificate {p.crt("server")};
        ssl_certificate_key {p.key("server")};
        ssl_protocols TLSv1.3;
        ssl_verify_client on;
        ssl_client_certificate {p.ca};
        ssl_session_tickets on;
    }}
}}
"""
    path = d / f"nginx-{port}.conf"
    path.write_text(text)
    return ["nginx", "-c", str(path), "-p", str(d), "-e", "stderr"]


def _haproxy(setup: Setup, port: int, target: int, workers: int) -> list[str]:
    if workers != 1:
        raise ValueError("haproxy runs one thread per core by itself")
    p, d = setup.pki, setup.dir
    pem = d / "server-haproxy.pem"  # haproxy wants the certificate and key in one file
    pem.write_bytes(p.crt("server").read_bytes() + p.key("server").read_bytes())
    text = f"""\
global
    maxconn {_cap_within_file_limit()}
    nbthread {os.cpu_count() or 1}
    log stdout format raw local0 info

defaults
    mode tcp
    log global
    option tcplog
    timeout connect 5s
    timeout client 1h
    timeout server 1h

frontend tls
    bind {LOCALHOST}:{port} ssl crt {pem} ca-file {p.ca} verify required ssl-min-ver TLSv1.3
    default_backend target

backend target
    server target {LOCALHOST}:{target}
"""
    path = d / f"haproxy-{port}.cfg"
    path.write_text(text)
    return ["haproxy", "-db", "-f", str(path)]
