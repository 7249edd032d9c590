"""One TLS context for a node, to listen and to dial with: mutual TLS against one CA.

`node_context(cert, key, ca)` is what ``pgregistry node --tls-cert --tls-key --tls-ca``
uses: an ``ssl.SSLContext(ssl.PROTOCOL_TLS)`` (usable on both sides, so a `Node` takes it
as ``ssl`` alone) that presents `cert` (with its private key `key`), trusts only the
certificate authority in `ca`, requires a certificate from every peer, whether it dials
or is dialled, and checks, when dialling, that the certificate is valid for the host
dialled. The node layer then requires each certificate to prove the peer's node id (its
name as a subjectAltName DNS entry or commonName: see "The trust model" in
docs/protocol.md). So a node certificate needs, in its subjectAltName, ``DNS:<name>``
and the host peers dial (``IP:<address>`` or ``DNS:<hostname>``): docs/deployment.md
shows how to make them with ``openssl``.
"""

from __future__ import annotations

import os
import ssl
import warnings

__all__ = ["node_context"]


def node_context(cert: str | os.PathLike[str], key: str | os.PathLike[str],
                 ca: str | os.PathLike[str]) -> ssl.SSLContext:
    """A both-ways context presenting `cert`/`key`, verifying every peer against `ca`.

    Raises `OSError` (`ssl.SSLError` among them) when a file is missing, unreadable or
    not what it should be (a key that does not match the certificate, say).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # PROTOCOL_TLS: the one protocol for both sides
        context = ssl.SSLContext(ssl.PROTOCOL_TLS)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED  # mutual TLS: diallers prove their node ids too
    context.check_hostname = True
    context.load_cert_chain(cert, key)
    context.load_verify_locations(ca)
    return context
