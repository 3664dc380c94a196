"""`tunnel ca`: the private CA and its enrollment service.

The CA itself (init, issue, revoke, CRL, list, show) is tunnel.pki; this package adds
enrollment over EST (RFC 7030) so that hosts renew their own short-lived certificates:

* tokens.py: one-time enrollment tokens (`tunnel ca token`), stored as SHA-256 hashes;
* est.py: the EST decisions, request -> response, without sockets;
* serve.py: `tunnel ca serve`, the HTTPS server on trio (mutual TLS optional);
* enroll.py: `tunnel ca enroll`, the client that makes a key and gets it certified.
"""
