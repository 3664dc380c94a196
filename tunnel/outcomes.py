"""How a connection was refused or how it ended, as values: each carries the text for the
log line and a bounded metric label, both chosen where the outcome is decided, so that
nothing downstream parses a sentence back into a label (h11's events are the model).

Refusals: `refused: TEXT tunnel=...` in the log, `tunnel_connections_refused_total{reason=LABEL}`.
Ends: `closed ... why=TEXT` in the log, `tunnel_connections_closed_total{reason=LABEL}`.
The labels are few and fixed (see REFUSAL_LABELS and END_LABELS); the texts may name
peers, targets and certificates.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass


@dataclass(frozen=True)
class Outcome:
    """A refusal or an end: `text` for people, `label` for metrics."""

    label: str
    text: str

    def __str__(self) -> str:
        return self.text

    def about(self, what: str) -> Outcome:
        """The same outcome, said of something: `server 10.0.0.5:6380: unknown CA`. The
        label stays the outcome's own (it used to become `server 10.0.0.5`)."""
        return Outcome(self.label, f"{what}: {self.text}")


def refusal(label: str, detail: str | None = None) -> Outcome:
    """A refusal whose text is its label, with an optional detail after it: `label: detail`
    (or `label (detail)` when the detail starts with a parenthesis)."""
    if detail is None:
        return Outcome(label, label)
    return Outcome(label, f"{label} {detail}" if detail.startswith("(") else f"{label}: {detail}")


# -- refusals ----------------------------------------------------------------------------

HANDSHAKE_TIMEOUT = refusal("handshake timeout")
NO_CERTIFICATE = refusal("no certificate")
CERTIFICATE_EXPIRED = refusal("certificate expired")
CERTIFICATE_NOT_YET_VALID = refusal("certificate not yet valid")
REVOKED = refusal("revoked")
CRL_EXPIRED = refusal("CRL expired")
CRL_UNAVAILABLE = refusal("CRL unavailable")
PEER_IS_A_CA = refusal("peer certificate is a CA")


def during_handshake(detail: object) -> Outcome:
    return refusal("during handshake", str(detail))


def not_allowed(detail: str) -> Outcome:
    return refusal("not allowed", detail)


def no_longer_allowed(why: Outcome) -> Outcome:
    """A peer the new rules refuse, on reload: the rule's own label."""
    return Outcome(why.label, f"no longer allowed ({why.text})")


def refused_by_server(detail: str) -> Outcome:
    """Client mode: the server refused our certificate (its alert, or how it ended)."""
    return refusal("refused by server", detail)


# -- what OpenSSL says when a handshake fails ---------------------------------------------

_VERIFY_REASONS = {
    2: refusal("unknown CA"),
    9: CERTIFICATE_NOT_YET_VALID,
    10: CERTIFICATE_EXPIRED,
    18: refusal("unknown CA", "(self-signed certificate)"),
    19: refusal("unknown CA", "(self-signed certificate in chain)"),
    20: refusal("unknown CA"),
    21: refusal("unknown CA"),
    23: REVOKED,
    3: CRL_UNAVAILABLE,
    11: refusal("CRL not yet valid"),
    12: CRL_EXPIRED,
    26: refusal("certificate not valid for this purpose"),
    62: refusal("hostname mismatch"),
    64: refusal("IP address mismatch"),
}

_NOT_TLS = refusal("not a TLS handshake")
_TOO_OLD = refusal("TLS version too old")
_NO_GROUP = refusal("no shared key exchange group")
_CLOSED_IN_HANDSHAKE = refusal("closed during the handshake")
_SSL_REASONS = {
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": NO_CERTIFICATE,
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": NO_CERTIFICATE,
    "WRONG_VERSION_NUMBER": _NOT_TLS,
    "HTTP_REQUEST": refusal("not a TLS handshake", "(HTTP request)"),
    "UNEXPECTED_MESSAGE": _NOT_TLS,
    "PACKET_LENGTH_TOO_LONG": _NOT_TLS,
    "UNSUPPORTED_PROTOCOL": _TOO_OLD,
    "TLSV1_ALERT_PROTOCOL_VERSION": _TOO_OLD,
    "NO_SHARED_CIPHER": refusal("no shared cipher"),
    # TLS 1.3: none of the peer's groups is one of tls.GROUPS (ffdhe8192 only, say).
    "NO_SUITABLE_KEY_SHARE": _NO_GROUP,
    "NO_SHARED_GROUPS": _NO_GROUP,
    # A handshake message longer than OpenSSL allows it: in practice the peer's
    # certificate list past tls.MAX_CERT_LIST (the other messages' bounds are far beyond
    # anything a peer sends, a ClientHello's is 128 KiB).
    "EXCESSIVE_MESSAGE_SIZE": refusal("certificate list too long"),
    "NO_PROTOCOLS_AVAILABLE": _TOO_OLD,
    "TLSV1_ALERT_UNKNOWN_CA": refusal("the peer does not trust our certificate", "(unknown CA)"),
    "SSLV3_ALERT_BAD_CERTIFICATE": refusal("the peer rejected our certificate"),
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": refusal("the peer says our certificate expired"),
    "SSLV3_ALERT_CERTIFICATE_REVOKED": refusal("the peer says our certificate is revoked"),
    "UNEXPECTED_EOF_WHILE_READING": _CLOSED_IN_HANDSHAKE,
}


def handshake_failure(exc: ssl.SSLError) -> Outcome:
    """A short, stable reason for a failed handshake, for the refused: log line."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _VERIFY_REASONS.get(exc.verify_code) or refusal("certificate rejected", exc.verify_message)
    if isinstance(exc, ssl.SSLEOFError):
        return _CLOSED_IN_HANDSHAKE
    reason = str(exc.reason or "")
    if reason in _SSL_REASONS:
        return _SSL_REASONS[reason]
    return Outcome("TLS error", ssl_reason(exc))


def received_alert(exc: ssl.SSLError) -> str | None:
    """The TLS alert the peer sent, by its RFC 8446 section 6 name in words (`unknown ca`,
    `bad certificate`, `certificate required`), read from OpenSSL's reason code for a
    received alert (SSLV3_ALERT_*, TLSV1_ALERT_*, TLSV13_ALERT_*); None for any other
    failure (one found on our side)."""
    reason = str(exc.reason or "")
    for prefix in ("SSLV3_ALERT_", "TLSV1_ALERT_", "TLSV13_ALERT_"):
        if reason.startswith(prefix):
            return reason.removeprefix(prefix).replace("_", " ").lower()
    return None


def ssl_words(exc: ssl.SSLError) -> str:
    """OpenSSL's reason code in words (`CERTIFICATE_VERIFY_FAILED` → `certificate verify
    failed`), or the error's message when it has no code."""
    reason = exc.reason
    return reason.replace("_", " ").lower() if reason else str(exc)


def ssl_reason(exc: ssl.SSLError) -> str:
    """`TLS error: <reason in words>`: a failure with no shorter name of its own."""
    return f"TLS error: {ssl_words(exc)}"


# -- ends --------------------------------------------------------------------------------

BOTH_SIDES_CLOSED = Outcome("done", "both sides closed")
CLOSED_BY_THE_DAEMON = Outcome("shutdown", "closed by the daemon")
DRAIN_TIMEOUT = Outcome("shutdown", "drain timeout")
CERTIFICATE_EXPIRED_END = Outcome("expired", "certificate expired")  # limits.close_on_expiry


def idle(seconds: float) -> Outcome:
    return Outcome("idle", f"idle for {seconds:g}s")


def side_broke(side: str, detail: object) -> Outcome:
    """One side of the relay broke: `client: connection reset`, `target: ...`."""
    return Outcome("client error" if side == "client" else "target error", f"{side}: {detail}")


def closed_on_reload(why: Outcome) -> Outcome:
    return Outcome("reload", f"closed on reload: {why.text}")


def target_unavailable(detail: str) -> Outcome:
    return Outcome("target unavailable", f"target unavailable: {detail}")


END_LABELS = ("done", "idle", "client error", "target error", "reload", "target unavailable", "shutdown", "expired")
