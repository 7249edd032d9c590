"""Throwaway TLS material for tests: a certificate authority and node certificates it signs.

Made with the `cryptography` package when it is installed, else with the ``openssl``
command; a test that needs certificates is skipped, saying why, when neither exists.
Every certificate is valid for 127.0.0.1 (so a dialler's hostname check passes) and
names what the test asks for in its subject commonName and subjectAltName DNS entries.
"""

from __future__ import annotations

import importlib.util
import shutil
import ssl
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import pytest

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

_OPENSSL_TIMEOUT = 60.0


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=_OPENSSL_TIMEOUT)


class TestCA:
    """A certificate authority in `directory`; `issue` makes node certificates it signs."""

    __test__ = False  # not a test class, whatever its name

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.cert = directory / "ca.pem"
        self.key = directory / "ca-key.pem"
        self._serial = 1
        if importlib.util.find_spec("cryptography") is not None:
            self._backend = "cryptography"
            self._make_ca_cryptography()
        elif shutil.which("openssl") is not None:
            self._backend = "openssl"
            _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                     "-keyout", str(self.key), "-out", str(self.cert), "-days", "2",
                     "-subj", "/CN=pgregistry test CA",
                     "-addext", "basicConstraints=critical,CA:TRUE",
                     "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        else:
            pytest.skip("neither the cryptography package nor the openssl command is available to make "
                        "test certificates")

    def issue(self, common_name: str, dns: tuple[str, ...] = ()) -> tuple[Path, Path]:
        """A certificate and its key for subject CN `common_name` and DNS names `dns` (and IP 127.0.0.1)."""
        self._serial += 1
        stem = self.directory / f"node-{self._serial}"
        cert, key = stem.with_suffix(".pem"), stem.with_name(stem.name + "-key.pem")
        if self._backend == "cryptography":
            self._issue_cryptography(common_name, dns, cert, key)
            return cert, key
        csr = stem.with_suffix(".csr")
        extensions = stem.with_suffix(".ext")
        alt_names = ",".join([*(f"DNS:{name}" for name in dns), "IP:127.0.0.1"])
        extensions.write_text(
            f"subjectAltName={alt_names}\nbasicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\n"
        )
        _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                 "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={common_name}")
        _openssl("x509", "-req", "-in", str(csr), "-CA", str(self.cert), "-CAkey", str(self.key),
                 "-set_serial", str(self._serial), "-days", "2", "-extfile", str(extensions), "-out", str(cert))
        return cert, key

    def node(self, name: str) -> dict[str, Any]:
        """``ssl``/``client_ssl`` options (mutual TLS) for a node named `name` (its name as CN and DNS name)."""
        server, client = self.contexts(*self.issue(name, (name,)))
        return {"ssl": server, "client_ssl": client}

    def contexts(self, cert: Path, key: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
        """``(server, client)`` contexts presenting `cert`, trusting this CA, verifying the peer both ways."""
        server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server.load_cert_chain(cert, key)
        server.load_verify_locations(self.cert)
        server.verify_mode = ssl.CERT_REQUIRED  # mutual TLS: a dialler presents its node certificate
        client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client.load_cert_chain(cert, key)
        client.load_verify_locations(self.cert)
        return server, client

    # -- cryptography -----------------------------------------------------------------

    def _make_ca_cryptography(self) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pgregistry test CA")])
        builder = (
            self._builder(name, name, key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        )
        self._write(builder, key, key, self.cert, self.key)

    def _issue_cryptography(self, common_name: str, dns: tuple[str, ...], cert: Path, key_path: Path) -> None:
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        ca_key = cast("ec.EllipticCurvePrivateKey",
                      serialization.load_pem_private_key(self.key.read_bytes(), password=None))
        ca_name = x509.load_pem_x509_certificate(self.cert.read_bytes()).subject
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        alt_names: list[x509.GeneralName] = [x509.DNSName(name) for name in dns]
        alt_names.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
        builder = (
            self._builder(subject, ca_name, key.public_key())
            .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
        )
        self._write(builder, key, ca_key, cert, key_path)

    def _builder(self, subject: x509.Name, issuer: x509.Name,
                 public_key: ec.EllipticCurvePublicKey) -> x509.CertificateBuilder:
        import datetime

        from cryptography import x509

        now = datetime.datetime.now(datetime.UTC)
        return (
            x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=2))
        )

    @staticmethod
    def _write(builder: x509.CertificateBuilder, key: ec.EllipticCurvePrivateKey,
               signing_key: ec.EllipticCurvePrivateKey, cert_path: Path, key_path: Path) -> None:
        from cryptography.hazmat.primitives import hashes, serialization

        cert = builder.sign(signing_key, hashes.SHA256())
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
