"""A tunnel's runtime state: its configuration with everything it names loaded and checked
(TLS context, certificates, trust), built up front and swapped whole on reload; and the
judgements made of peers against it (`still_admits` on reload, `check_peer` after each
handshake)."""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from tunnel.config import Address, TunnelConfig
from tunnel.identity import Identity, decide, identity_from_der, profile_refusal
from tunnel.outcomes import NO_CERTIFICATE, Outcome, no_longer_allowed
from tunnel.session_tickets import use_session_tickets
from tunnel.streams import TLSStream
from tunnel.ticket_keys import TicketKeys, process_secret, trust_scope
from tunnel.tls import build_context
from tunnel.trust import Certificates, PeerRecords, Trust, check_certificates, load_certificates, load_trust
from tunnel.unix_peers import PeerCredentials, unix_peer_refusal


class Resumption:
    """What resuming TLS sessions needs to remember under one state: the part of it that
    changes while it serves, kept apart from the rest, which never does.

    `sessions` (client mode): the last session per target, offered to resume;
    `not_resuming`: the targets that failed a handshake offering one and then completed a
    full one (tunnel/client_side.py), offered none again. `peers`:
    the verdicts of full handshakes (see trust.PeerRecords). Both are tied to the state's
    SSL context: a reload makes a new state, a new context and a new Resumption
    together. A server's sessions are tickets under keys derived from its name and trust
    (tunnel.ticket_keys): they resume across a reload that keeps tls.ca and tls.crl,
    never across one that changes them."""

    def __init__(self, trust: Trust) -> None:
        self.sessions: dict[Address, ssl.SSLSession] = {}
        self.not_resuming: set[Address] = set()
        self.peers = PeerRecords(trust)


@dataclass(frozen=True)
class TunnelState:
    """Everything a connection needs, built and validated up front; swapped whole on reload."""

    config: TunnelConfig
    context: ssl.SSLContext
    trust: Trust
    certificates: Certificates  # the tunnel's own certificate and CA, as loaded
    warnings: tuple[str, ...] = ()
    resumption: Resumption = field(init=False, compare=False)  # the one mutable part

    def __post_init__(self) -> None:
        object.__setattr__(self, "resumption", Resumption(self.trust))

    @classmethod
    def build(cls, config: TunnelConfig) -> TunnelState:
        """Validate everything the config names (ConfigError on the first problem)."""
        context = build_context(config)
        certificates = load_certificates(config)
        warnings = check_certificates(config, certificates=certificates)
        state = cls(
            config=config,
            context=context,
            trust=load_trust(config, certificates),
            certificates=certificates,
            warnings=tuple(warnings),
        )
        if config.mode == "server":
            state.share_sessions()
        return state

    def share_sessions(self) -> bool:
        """Server mode: resume from session tickets under the keys every process of this
        tunnel derives (tunnel.session_tickets, tunnel.ticket_keys), resuming a session
        only if `PeerRecords.resumable`. False where the context cannot take them: it
        keeps OpenSSL's own tickets, which resume in this process only."""
        keys = TicketKeys(process_secret(), trust_scope(self.config.name, self.trust))
        peers = self.resumption.peers
        return use_session_tickets(self.context, keys, lambda leaf: peers.resumable(leaf, datetime.now(UTC)))

    @property
    def expiries(self) -> list[tuple[Path, datetime]]:
        """(file, not-after) for the tunnel's certificate and CA file."""
        return self.certificates.expiries(self.config.tls)

    def still_admits(
        self, identity: Identity | None, peer_chain: tuple[bytes, ...], credentials: PeerCredentials | None
    ) -> Outcome | None:
        """Why an open connection's peer is no longer acceptable under this state, or None:
        the unix peer's credentials against unix.allow_*, then the chain it presented,
        judged as a full handshake would judge it now (path to an anchor, revocation of
        every certificate on it, current CRLs), then the allow rules. With
        limits.close_on_expiry false, a peer certificate that expired since is judged as
        of just before it expired (the connection may outlive it)."""
        if credentials is not None and self.config.unix.checks_peers:
            why = unix_peer_refusal(credentials, self.config.unix)
            if why is not None:
                return no_longer_allowed(why)
        if identity is None or not peer_chain:
            return None
        now = datetime.now(UTC)
        if not self.config.limits.close_on_expiry and identity.not_after <= now:
            # limits.close_on_expiry false: the connection may outlive its peer's
            # certificate; judge the chain as of the moment before it expired.
            now = identity.not_after - timedelta(seconds=1)
        why = self.trust.refusal(peer_chain, now)
        if why is not None:
            return Outcome("unknown CA", "its CA is no longer trusted") if why.label == "unknown CA" else why
        if self.config.allow is not None:
            decision = decide(identity, self.config.allow)
            if not decision.allowed:
                return no_longer_allowed(decision.refusal)
        return None

    def check_peer(self, stream: TLSStream) -> Outcome | None:
        """After a handshake, in both modes: refuse a certificate no peer may present
        (identity.profile_refusal: a CA, several CNs); then remember a full handshake's
        verdict, or judge a resumed one (which OpenSSL did not verify) as a full
        handshake would. Why to refuse, or None."""
        leaf = stream.peer_certificate()
        if leaf is None:
            return NO_CERTIFICATE
        why = profile_refusal(identity_from_der(leaf))
        if why is not None:
            return why
        peers = self.resumption.peers
        if stream.ssl.session_reused:
            return peers.resumption_refusal(leaf, datetime.now(UTC))
        if not peers.knows(leaf):  # the chains cost a certificate object each: once per leaf
            peers.remember(stream.presented_chain(), stream.verified_chain())
        return None
