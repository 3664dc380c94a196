#!/usr/bin/env bash
# The README's "Quick start by hand", step by step, in a fresh directory: a CA, a server
# tunnel in front of Redis and a client tunnel beside the application, PONG through the
# pair, then a revocation the server tunnel picks up by itself.
#
# Usage: scripts/quickstart.sh [WORKDIR]   (default: a new temporary directory)
# Needs `tunnel` on PATH, redis-cli, and a Redis on $REDIS_PORT (default 6379). The ports
# of the walkthrough (7390, 7391, 7399) can be moved with QUICKSTART_PORTS="C S STATUS",
# which the tests use to stay clear of anything else on the machine.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-$(mktemp -d)}
read -r client_port server_port status_port <<<"${QUICKSTART_PORTS:-7390 7391 7399}"
redis_port=${REDIS_PORT:-6379}

# The README's own blocks, in order: sh blocks are run, yaml blocks written to the file the
# sentence before them names. Ports are moved when asked to; nothing else is changed.
blocks=$(python3 - "$here/README.md" "$client_port" "$server_port" "$status_port" "$redis_port" <<'PY'
import re, sys, json
text = open(sys.argv[1]).read()
section = text.split("## Quick start by hand", 1)[1].split("\n## ", 1)[0]
ports = {"7390": sys.argv[2], "7391": sys.argv[3], "7399": sys.argv[4], "6379": sys.argv[5]}
move = lambda s: re.sub(r"\b(7390|7391|7399|6379)\b", lambda m: ports[m.group(1)], s)
out = []
for match in re.finditer(r"(?s)([^\n]*)\n\n```(sh|yaml)\n(.*?)```", section):
    before, kind, body = match.groups()
    if kind == "yaml":
        name = re.findall(r"`([\w.-]+\.yaml)`", before)[-1]
        out.append({"write": name, "text": move(body)})
    else:
        out.append({"run": move(body)})
print(json.dumps(out))
PY
)
mkdir -p "$work"
cd "$work"
count=$(python3 -c 'import json,sys; print(len(json.loads(sys.argv[1])))' "$blocks")
for ((i = 0; i < count; i++)); do
    python3 - "$blocks" "$i" >"$work/.block" <<'PY'
import json, sys
block = json.loads(sys.argv[1])[int(sys.argv[2])]
print(("write " + block["write"] + "\n" + block["text"]) if "write" in block else ("run\n" + block["run"]), end="")
PY
    read -r action name <"$work/.block"
    if [[ $action == write ]]; then
        tail -n +2 "$work/.block" >"$name"
        echo "+ wrote $name"
    else
        tail -n +2 "$work/.block" >"$work/.step.sh"
        echo "+ $(head -n 1 "$work/.step.sh") ..."
        # One shell for the whole walkthrough would keep `cd` and `%1`; each block sources
        # the previous blocks' state through the files it leaves, and the directory:
        source "$work/.step.sh"
    fi
done
rm -f "$work/.block" "$work/.step.sh"
echo "quickstart: ok in $PWD"
