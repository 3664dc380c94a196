"""Server-side TLS session resumption from stateless session tickets under keys every
process of the tunnel shares (tunnel.ticket_keys), set on the context through ctypes.

Why tickets, not a session cache: a cache lives in one process. With `--workers 2` a
client whose next connection the kernel gives to the other worker made a full handshake
(half of all resumptions), and a restart forgot every session. A ticket resumes in any
process that has its keys, and ticket_keys makes every worker, and the new process of a
hand-over, derive the same keys.

What it costs: a ticket carries the whole session, the client's certificate included,
which OpenSSL 3.0 parses again for every resumption (d2i_X509: some 0.1 ms here) and
serialises and encrypts for every ticket it issues. Measured on the server's side of
handshakes between SSLObjects through memory BIOs (server CPU, best of 3 x 400): a
resumption costs 0.42-0.45 ms from a ticket against 0.22 ms from the in-process cache
used before (OpenSSL's own tickets, random key per context: 0.55 ms), and a full
handshake 1.2 ms against 0.85 ms. Issuing no new ticket on a resumption saved nothing
measurable, so each resumption gets a fresh ticket, as OpenSSL does by default.

Set through OpenSSL (ssl.h, OpenSSL 3.0), on the `SSL_CTX` tunnel.openssl finds:

* `SSL_CTX_set_tlsext_ticket_key_evp_cb` (SSL_CTX_set_tlsext_ticket_key_cb(3)): the
  callback that picks the key name, AES-256-CBC key and HMAC-SHA256 key for a new
  ticket, and finds them again by name for a ticket presented;
* `SSL_CTX_set_session_ticket_cb` (SSL_CTX_set_session_ticket_cb(3)): the decrypt
  callback that, once a ticket is opened, decides whether to resume it. It declines
  (`SSL_TICKET_RETURN_IGNORE_RENEW`: a full handshake, and a new ticket) a session whose
  leaf this process cannot judge: no verdict of a full handshake remembered here, and no
  path from the leaf alone through tls.ca (the client had presented intermediates that
  tls.ca lacks, in a full handshake with another worker). A resumption is so never
  refused where a full handshake would have admitted the client. Every other check
  (revocation, CRL staleness, expiry, the allow rules) is made after the handshake, as
  before (`TunnelState.check_peer`).
* `SSL_CTX_set_session_cache_mode(SERVER | NO_INTERNAL)`: no session is kept in the
  process (with a ticket key callback OpenSSL would otherwise also cache each TLS 1.3
  session, the client's certificate with it: some 10 KiB apiece).

Both callbacks run inside the handshake, on the thread that runs it, and catch every
exception: an error makes no ticket, or a full handshake, never a failed handshake.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import ssl
from collections.abc import Callable
from functools import cache
from typing import Any

from tunnel.openssl import ctx_ctrl, libssl, ssl_ctx_pointer
from tunnel.ticket_keys import AES_BYTES, HMAC_BYTES, NAME_BYTES, TicketKey, TicketKeys

log = logging.getLogger("tunnel")

_SSL_CTRL_SET_SESS_CACHE_MODE = 44
_SSL_CTRL_GET_SESS_CACHE_MODE = 45
_SSL_SESS_CACHE_SERVER = 0x0002
_SSL_SESS_CACHE_NO_INTERNAL = 0x0300  # NO_INTERNAL_LOOKUP | NO_INTERNAL_STORE

# SSL_TICKET_STATUS and SSL_TICKET_RETURN (ssl.h)
_TICKET_SUCCESS, _TICKET_SUCCESS_RENEW = 5, 6
_RETURN_IGNORE_RENEW, _RETURN_USE, _RETURN_USE_RENEW = 2, 3, 4

_IV_BYTES = 16  # AES-256-CBC
_OSSL_PARAM_UTF8_STRING, _OSSL_PARAM_OCTET_STRING = 4, 5
_OSSL_PARAM_UNMODIFIED = ctypes.c_size_t(-1).value


class _OsslParam(ctypes.Structure):
    _fields_ = [
        ("key", ctypes.c_char_p),
        ("data_type", ctypes.c_uint),
        ("data", ctypes.c_void_p),
        ("data_size", ctypes.c_size_t),
        ("return_size", ctypes.c_size_t),
    ]


_KeyCallback = ctypes.CFUNCTYPE(
    ctypes.c_int,
    ctypes.c_void_p,  # SSL *
    ctypes.c_void_p,  # unsigned char key_name[16]
    ctypes.c_void_p,  # unsigned char iv[EVP_MAX_IV_LENGTH]
    ctypes.c_void_p,  # EVP_CIPHER_CTX *
    ctypes.c_void_p,  # EVP_MAC_CTX *
    ctypes.c_int,  # enc
)
_DecryptCallback = ctypes.CFUNCTYPE(
    ctypes.c_int,
    ctypes.c_void_p,  # SSL *
    ctypes.c_void_p,  # SSL_SESSION *
    ctypes.c_void_p,  # const unsigned char *keyname
    ctypes.c_size_t,
    ctypes.c_int,  # SSL_TICKET_STATUS
    ctypes.c_void_p,  # arg
)


class _KeyMaterial:
    """One TicketKey in the shapes OpenSSL takes it: C buffers and the HMAC's OSSL_PARAMs."""

    def __init__(self, key: TicketKey) -> None:
        self.key = key
        self.name = key.name
        self._hmac_key = ctypes.create_string_buffer(key.hmac_key, HMAC_BYTES)
        self._digest = ctypes.create_string_buffer(b"SHA256")
        self.aes_key = ctypes.create_string_buffer(key.aes_key, AES_BYTES)
        self.params = (_OsslParam * 3)(
            _OsslParam(
                b"key",
                _OSSL_PARAM_OCTET_STRING,
                ctypes.addressof(self._hmac_key),
                HMAC_BYTES,
                _OSSL_PARAM_UNMODIFIED,
            ),
            _OsslParam(b"digest", _OSSL_PARAM_UTF8_STRING, ctypes.addressof(self._digest), 6, _OSSL_PARAM_UNMODIFIED),
            _OsslParam(None, 0, None, 0, 0),
        )


class SessionTickets:
    """The ticket callbacks of one server context (keep it alive as long as the context:
    `use_session_tickets` hangs it on the context). `resumable(leaf_der)`: whether a
    session whose client certificate is this (DER) may resume here (see the module
    docstring)."""

    def __init__(self, keys: TicketKeys, resumable: Callable[[bytes], bool]) -> None:
        self.keys = keys
        self.resumable = resumable
        self._material: dict[int, _KeyMaterial] = {}
        self.key_callback = _KeyCallback(self._on_key)
        self.decrypt_callback = _DecryptCallback(self._on_decrypt)

    def _material_of(self, key: TicketKey) -> _KeyMaterial:
        material = self._material.get(key.period)
        if material is None or material.key is not key:
            material = _KeyMaterial(key)
            self._material = {p: m for p, m in self._material.items() if p >= key.period - 1} | {key.period: material}
        return material

    def _on_key(self, _ssl: int, key_name: int, iv: int, cipher_ctx: int, mac_ctx: int, enc: int) -> int:
        """SSL_CTX_set_tlsext_ticket_key_evp_cb's callback: 1 (keys set), 2 (set, and renew
        the ticket), 0 (no ticket / not found: also on any error, rather than OpenSSL's
        -1, which would fail the handshake)."""
        try:
            lib = _bindings()
            if enc:
                material = self._material_of(self.keys.encrypting())
                ctypes.memmove(key_name, material.name, NAME_BYTES)
                ctypes.memmove(iv, os.urandom(_IV_BYTES), _IV_BYTES)
                if lib.EVP_EncryptInit_ex(cipher_ctx, _aes_256_cbc(), None, material.aes_key, iv) != 1:
                    return 0
                return 1 if lib.EVP_MAC_CTX_set_params(mac_ctx, material.params) == 1 else 0
            found = self.keys.decrypting(ctypes.string_at(key_name, NAME_BYTES))
            if found is None:
                return 0
            key, renew = found
            material = self._material_of(key)
            if lib.EVP_MAC_CTX_set_params(mac_ctx, material.params) != 1:
                return 0
            if lib.EVP_DecryptInit_ex(cipher_ctx, _aes_256_cbc(), None, material.aes_key, iv) != 1:
                return 0
            return 2 if renew else 1
        except Exception:  # never let an exception into OpenSSL: no ticket / not found
            log.exception("session ticket key callback failed")
            return 0

    def _on_decrypt(self, _ssl: int, session: int, _name: int, _length: int, status: int, _arg: int) -> int:
        """SSL_CTX_set_session_ticket_cb's decrypt callback (see the module docstring)."""
        if status not in (_TICKET_SUCCESS, _TICKET_SUCCESS_RENEW):
            return _RETURN_IGNORE_RENEW  # what OpenSSL does without a callback
        try:
            lib = _bindings()
            leaf = _der(lib, lib.SSL_SESSION_get0_peer(session))
            if leaf is None or not self.resumable(leaf):
                return _RETURN_IGNORE_RENEW
            return _RETURN_USE if status == _TICKET_SUCCESS else _RETURN_USE_RENEW
        except Exception:
            log.exception("session ticket decrypt callback failed")
            return _RETURN_IGNORE_RENEW


def _der(lib: Any, x509: int | None) -> bytes | None:
    """i2d_X509 of an X509 * (None for NULL or an encoding error)."""
    if not x509:
        return None
    size = lib.i2d_X509(x509, None)
    if size <= 0:
        return None
    buffer = ctypes.create_string_buffer(size)
    cursor = ctypes.c_void_p(ctypes.addressof(buffer))
    if lib.i2d_X509(x509, ctypes.byref(cursor)) != size:
        return None
    return buffer.raw


def use_session_tickets(ctx: ssl.SSLContext, keys: TicketKeys, resumable: Callable[[bytes], bool]) -> bool:
    """Make a server context issue and resume tickets under `keys`, resuming only
    sessions whose client certificate `resumable` accepts, with no session kept in the
    process. False (`ctx` unchanged) if its SSL_CTX cannot be reached safely or the
    libssl lacks the calls (OpenSSL before 3.0): then it keeps OpenSSL's own tickets,
    under a random key of this context only."""
    lib = _bindings()
    handle = ssl_ctx_pointer(ctx)
    if lib is None or handle is None:
        return False
    tickets = SessionTickets(keys, resumable)
    if lib.SSL_CTX_set_tlsext_ticket_key_evp_cb(handle, tickets.key_callback) != 1:
        return False
    if lib.SSL_CTX_set_session_ticket_cb(handle, None, tickets.decrypt_callback, None) != 1:
        lib.SSL_CTX_set_tlsext_ticket_key_evp_cb(handle, None)
        return False
    ctx.__dict__["_tunnel_session_tickets"] = tickets  # the callbacks live as long as the context
    ctx.options &= ~ssl.OP_NO_TICKET
    mode = ctx_ctrl(ctx, _SSL_CTRL_GET_SESS_CACHE_MODE, 0)
    if mode is not None:
        ctx_ctrl(ctx, _SSL_CTRL_SET_SESS_CACHE_MODE, _SSL_SESS_CACHE_SERVER | _SSL_SESS_CACHE_NO_INTERNAL)
    return True


def tickets_of(ctx: ssl.SSLContext) -> SessionTickets | None:
    """The SessionTickets `use_session_tickets` set on `ctx`, if any."""
    tickets = ctx.__dict__.get("_tunnel_session_tickets")
    return tickets if isinstance(tickets, SessionTickets) else None


@cache
def _aes_256_cbc() -> int:
    """AES-256-CBC fetched once from the default provider (EVP_CIPHER_fetch(3)): a cipher
    given by EVP_aes_256_cbc() is fetched again by every EVP_EncryptInit_ex in OpenSSL 3."""
    lib = _bindings()
    cipher = lib.EVP_CIPHER_fetch(None, b"AES-256-CBC", None)
    if not cipher:
        raise OSError("OpenSSL has no AES-256-CBC")
    return int(cipher)


@cache
def _bindings() -> Any:
    """The libssl/libcrypto calls used here, typed; None where one is missing."""
    lib = libssl()
    if lib is None:
        return None
    with contextlib.suppress(AttributeError):
        vp, c_int = ctypes.c_void_p, ctypes.c_int
        lib.SSL_CTX_set_tlsext_ticket_key_evp_cb.argtypes = [vp, _KeyCallback]
        lib.SSL_CTX_set_tlsext_ticket_key_evp_cb.restype = c_int
        lib.SSL_CTX_set_session_ticket_cb.argtypes = [vp, vp, _DecryptCallback, vp]
        lib.SSL_CTX_set_session_ticket_cb.restype = c_int
        lib.EVP_CIPHER_fetch.argtypes = [vp, ctypes.c_char_p, ctypes.c_char_p]
        lib.EVP_CIPHER_fetch.restype = vp
        for name in ("EVP_EncryptInit_ex", "EVP_DecryptInit_ex"):
            getattr(lib, name).argtypes = [vp, vp, vp, ctypes.c_char_p, vp]
            getattr(lib, name).restype = c_int
        lib.EVP_MAC_CTX_set_params.argtypes = [vp, ctypes.POINTER(_OsslParam)]
        lib.EVP_MAC_CTX_set_params.restype = c_int
        lib.SSL_SESSION_get0_peer.argtypes = [vp]
        lib.SSL_SESSION_get0_peer.restype = vp
        lib.i2d_X509.argtypes = [vp, vp]
        lib.i2d_X509.restype = c_int
        return lib
    return None
