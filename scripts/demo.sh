#!/usr/bin/env bash
# Set up a development CA and certificates under certs/, then run the example tunnels in
# config/ (Redis and MariaDB, each a server tunnel and its client tunnel) in the foreground.
set -euo pipefail
cd "$(dirname "$0")/.."
tunnel=.venv/bin/tunnel
if [[ ! -f certs/ca.crt ]]; then
    "$tunnel" ca init --dir certs --name "tunnel demo CA"
fi
[[ -f certs/redis.crt ]] || "$tunnel" ca issue --dir certs redis --server --dns redis.internal --dns localhost --ip 127.0.0.1
[[ -f certs/mariadb.crt ]] || "$tunnel" ca issue --dir certs mariadb --server --dns mariadb.internal --dns localhost --ip 127.0.0.1
[[ -f certs/app1.crt ]] || "$tunnel" ca issue --dir certs app1 --client
"$tunnel" check config/
echo "redis:   redis-cli -p 6390 ping           (needs redis-server on 6379)"
echo "mariadb: mariadb --protocol=TCP -P 3316 (needs mariadbd on 3306)"
exec "$tunnel" run config/
