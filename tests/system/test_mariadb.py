"""The real ``mariadb`` client through a client+server tunnel pair to a real MariaDB.

MySQL's protocol has the server speak first (the handshake greeting), while the client
waits: this only works if both tunnels dial their target without waiting for the
client's first byte.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.helpers import PKI
from tests.system.services import MariaDB, free_port, mariadb_client_argv
from tests.system.tunnel_process import address, client_doc, run_tunnel, server_doc


def test_mariadb_through_tunnel_pair(
    mariadb_server: MariaDB, mariadb_database: str, pki_files: PKI, tmp_path: Path
) -> None:
    server_port, client_port = free_port(), free_port()
    server = server_doc(pki_files, name="mariadb-in", port=server_port, target=address(mariadb_server.port))
    client = client_doc(pki_files, name="mariadb-out", port=client_port, target=address(server_port))
    sql = (
        "CREATE TABLE fruit (id INT PRIMARY KEY, name VARCHAR(32), note MEDIUMTEXT);"
        "INSERT INTO fruit VALUES (1, 'apple', REPEAT('a', 100000)), (2, 'pear', 'p'),"
        " (3, 'plum', REPEAT('z', 3));"
        "SELECT id, name, LENGTH(note) FROM fruit ORDER BY id;"
        "SELECT COUNT(*), SUM(LENGTH(note)) FROM fruit;"
        "SELECT note FROM fruit WHERE id = 1;"
        "SHOW SESSION STATUS LIKE 'Ssl_cipher';"
    )
    argv = [*mariadb_client_argv(client_port), f"--database={mariadb_database}", "--execute", sql]
    with run_tunnel(tmp_path / "tunnel", server, client) as tunnel:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        assert result.returncode == 0, f"{result.stderr}\n--- tunnel log ---\n{tunnel.log_text()}"
        lines = result.stdout.splitlines()
        assert lines[:3] == ["1\tapple\t100000", "2\tpear\t1", "3\tplum\t3"], result.stdout
        assert lines[3] == "3\t100004", result.stdout
        assert lines[4] == "a" * 100000, f"{len(lines[4])} bytes: {lines[4][:50]!r}..."
        # Plaintext MySQL protocol on both ends: the TLS is the tunnels'.
        assert lines[5].split("\t")[0] == "Ssl_cipher", result.stdout
        assert lines[5].split("\t")[1:] in ([], [""]), result.stdout
        assert len(lines) == 6, result.stdout

        tunnel.wait_for_log(r"closed tunnel=mariadb-in ")
        log = tunnel.log_text()
        assert "opened tunnel=mariadb-out" in log
        assert "refused" not in log, log
