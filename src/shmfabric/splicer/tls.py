"""TLS termination for the HTTP splicer: the server-side `ssl.SSLContext` built from `tls:`.

Python's `ssl` module (OpenSSL) does the cryptography and asyncio/uvloop the record layer; this
module only turns the configuration into a context, with errors a user can act on (which file,
what is wrong with it, how to fix it) instead of OpenSSL's codes. The master process builds the
context, once per configuration (at start and at each reload), and the workers it forks inherit
it (see http_server.run: they then share its session-ticket key); so a reload (SIGHUP) after the
files are replaced puts a renewed certificate into service without dropping a connection.
"""

from __future__ import annotations

import datetime as _dt
import os
import ssl
from typing import Any

__all__ = ["TlsError", "server_context", "certificate_expiry"]


class TlsError(Exception):
    """The certificate or key cannot be used (the message names the file and the fix)."""


_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def _readable(path: str, what: str) -> None:
    if not os.path.exists(path):
        raise TlsError(f"tls.{what}: {path!r} does not exist; fix: give the path of a PEM file")
    if os.path.isdir(path):
        raise TlsError(f"tls.{what}: {path!r} is a directory; fix: give the path of a PEM file")
    if not os.access(path, os.R_OK):
        raise TlsError(f"tls.{what}: {path!r} is not readable by this user; fix: its permissions")


def _look_at_pem(cert: str, key: str | None) -> str:
    """What is wrong with the files, judged from their PEM labels (OpenSSL only says "PEM lib")."""
    try:
        with open(cert, "rb") as f:
            cert_text = f.read()
        key_text = cert_text
        if key is not None:
            with open(key, "rb") as f:
                key_text = f.read()
    except OSError as exc:
        return f"tls: cannot read {exc.filename!r}: {exc.strerror}"
    key_name = "key" if key is not None else "cert"
    key_path = key if key is not None else cert
    for path, text, name in ((cert, cert_text, "cert"), (key_path, key_text, key_name)):
        for label in (b"CERTIFICATE", b"PRIVATE KEY", b"RSA PRIVATE KEY", b"EC PRIVATE KEY", b"ENCRYPTED PRIVATE KEY"):
            if text.count(b"-----BEGIN " + label + b"-----") > text.count(b"-----END " + label + b"-----"):
                what = label.decode().lower()
                return (f"tls.{name}: {path!r} is cut short: a '-----BEGIN {label.decode()}-----' line has no "
                        f"'-----END {label.decode()}-----' after it (a file half written or half copied); fix: "
                        f"write the whole {what} again")
    if b"-----BEGIN CERTIFICATE-----" not in cert_text:
        return (f"tls.cert: {cert!r} holds no PEM certificate (no '-----BEGIN CERTIFICATE-----' line); fix: the "
                "certificate in PEM form (`openssl x509 -in FILE.der -inform der -out FILE.pem` converts DER)")
    if b"ENCRYPTED PRIVATE KEY-----" in key_text or b"Proc-Type: 4,ENCRYPTED" in key_text:
        return (f"tls.{key_name}: the private key in {key_path!r} is encrypted with a passphrase, which the splicer "
                "cannot ask for; fix: store it decrypted, readable only by this user "
                "(`openssl pkey -in KEY -out KEY.plain`)")
    if b"PRIVATE KEY-----" not in key_text:
        if key is None:
            return (f"tls.cert: {cert!r} holds no private key; fix: add `key:` (--tls-key) with the key's file, or "
                    "append the key to the certificate file")
        return f"tls.key: {key!r} holds no PEM private key (no '-----BEGIN ... PRIVATE KEY-----' line); fix: the key file"
    return ""


def server_context(cfg: Any) -> ssl.SSLContext:
    """An SSLContext for accepting clients, from a `TlsConfig` (cert, key, min_version, ciphers).

    ALPN offers only http/1.1 (the splicer speaks HTTP/1.1), so a client asking for h2 falls
    back to HTTP/1.1 instead of failing. TlsError when a file is missing or unusable.
    """
    _readable(cfg.cert, "cert")
    if cfg.key is not None:
        _readable(cfg.key, "key")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _VERSIONS[cfg.min_version]
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    if cfg.ciphers:
        try:
            ctx.set_ciphers(cfg.ciphers)
        except ssl.SSLError:
            raise TlsError(f"tls.ciphers: OpenSSL accepts no cipher of {cfg.ciphers!r}; fix: an OpenSSL cipher "
                           "list such as 'ECDHE+AESGCM:ECDHE+CHACHA20' (`openssl ciphers -v LIST` shows what a "
                           "list selects; TLS 1.3 suites are not set here)") from None
    problem = _look_at_pem(cfg.cert, cfg.key)
    if problem:
        raise TlsError(problem)
    try:
        ctx.load_cert_chain(cfg.cert, cfg.key)
    except ssl.SSLError as exc:
        reason = str(getattr(exc, "reason", None) or exc)
        if "KEY_VALUES_MISMATCH" in reason.upper():
            later = _key_matches_later_certificate(cfg.cert, cfg.key or cfg.cert)
            if later:
                raise TlsError(f"tls.cert: the key {cfg.key or cfg.cert!r} belongs to certificate {later} in "
                               f"{cfg.cert!r}, not the first one: the server certificate must come first in the chain "
                               "file; fix: put the server's certificate first, then its intermediates") from None
            raise TlsError(f"tls: the key {cfg.key or cfg.cert!r} does not belong to the certificate {cfg.cert!r}; "
                           "fix: give the key the certificate was issued for") from None
        raise TlsError(f"tls: OpenSSL cannot load {cfg.cert!r}{' with the key ' + repr(cfg.key) if cfg.key else ''} "
                       f"({reason}); fix: PEM files with the certificate (chain) and its unencrypted private key") from None
    except OSError as exc:
        raise TlsError(f"tls: cannot read {cfg.cert!r}: {exc.strerror}") from None
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def _key_matches_later_certificate(cert: str, key: str) -> int:
    """The position (2, 3...) of the certificate in `cert` after the first whose public key is
    the key's in `key`, or 0 (none, or the files cannot be read that far)."""
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        with open(cert, "rb") as f:
            certs = x509.load_pem_x509_certificates(f.read())
        with open(key, "rb") as f:
            private = serialization.load_pem_private_key(f.read(), password=None)
        want = private.public_key().public_bytes(serialization.Encoding.DER,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo)
        for i, c in enumerate(certs[1:], start=2):
            if c.public_key().public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo) == want:
                return i
    except Exception:  # noqa: BLE001 - only a better message; the plain one stands otherwise
        return 0
    return 0


def certificate_expiry(path: str) -> _dt.datetime | None:
    """When the first certificate in `path` expires (UTC), or None if it cannot be read."""
    try:
        from cryptography import x509

        with open(path, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
        return cert.not_valid_after_utc
    except Exception:  # noqa: BLE001 - a best-effort warning only; load_cert_chain is the judge
        return None
