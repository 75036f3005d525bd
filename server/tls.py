"""TLS and mutual-TLS credentials for the gRPC server and its clients.

:func:`server_credentials` and :func:`channel_credentials` read PEM files and check them
before gRPC sees them, so a wrong path or a swapped cert/key fails at start-up with an error
that names the option (``tls_cert_file=...``) instead of a handshake failure later.
:func:`make_self_signed` writes a throw-away CA with a server and a client certificate, for
tests and local trials (needs ``cryptography``, part of the ``dev`` extra).
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
from pathlib import Path

import grpc

from resae_serve.errors import ResaeError

logger = logging.getLogger(__name__)

_PEM_START = b"-----BEGIN"
_CERT_MARKER = b"-----BEGIN CERTIFICATE-----"
_KEY_MARKER = b"PRIVATE KEY-----"


class TLSConfigError(ResaeError):
    """A TLS certificate, key or CA file is missing, unreadable or not PEM."""


def _read_pem(field: str, path: Path, kind: str) -> bytes:
    """Contents of the PEM file ``path`` for option ``field``; ``kind`` is cert or key."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise TLSConfigError(
            f"{field}={path}: no such file; give the path of a PEM {kind} file "
            "(resae_serve.server.tls.make_self_signed writes a test set)") from None
    except OSError as exc:
        raise TLSConfigError(
            f"{field}={path}: cannot be read ({exc.strerror or exc}); check that it is a "
            "file readable by the server's user") from None
    if not data.lstrip().startswith(_PEM_START):
        raise TLSConfigError(
            f"{field}={path}: not a PEM file (it does not start with '-----BEGIN'); give a "
            f"PEM-encoded {kind} (convert DER with `openssl x509 -inform der` or "
            "`openssl pkey -inform der`)")
    if kind == "certificate" and _CERT_MARKER not in data:
        raise TLSConfigError(
            f"{field}={path}: PEM file holds no '-----BEGIN CERTIFICATE-----' block; "
            "is it a private key given in place of a certificate?")
    if kind == "private key" and _KEY_MARKER not in data:
        raise TLSConfigError(
            f"{field}={path}: PEM file holds no private key block; is it a certificate "
            "given in place of a key?")
    return data


def server_credentials(cert_file: Path, key_file: Path,
                       client_ca_file: Path | None = None) -> grpc.ServerCredentials:
    """Server TLS credentials; with ``client_ca_file`` clients must present a cert it signed."""
    cert = _read_pem("tls_cert_file", cert_file, "certificate")
    key = _read_pem("tls_key_file", key_file, "private key")
    client_ca = (None if client_ca_file is None
                 else _read_pem("tls_client_ca_file", client_ca_file, "certificate"))
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None)


def channel_credentials(ca_file: Path | None = None, cert_file: Path | None = None,
                        key_file: Path | None = None) -> grpc.ChannelCredentials:
    """Client TLS credentials: trust ``ca_file`` (else the system roots); cert+key for mTLS."""
    if (cert_file is None) != (key_file is None):
        given, missing = (("tls_cert_file", "tls_key_file") if key_file is None
                          else ("tls_key_file", "tls_cert_file"))
        raise TLSConfigError(
            f"{given} is set but {missing} is not; a client certificate needs its private key "
            "(give both, or neither for server-only TLS)")
    ca = None if ca_file is None else _read_pem("tls_ca_file", ca_file, "certificate")
    cert = None if cert_file is None else _read_pem("tls_cert_file", cert_file, "certificate")
    key = None if key_file is None else _read_pem("tls_key_file", key_file, "private key")
    return grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert)


def make_self_signed(folder: Path, hostname: str = "localhost") -> dict[str, Path]:
    """Write a test CA, a server cert/key for ``hostname`` and a client cert/key into ``folder``.

    The server certificate names ``hostname``, ``localhost`` and ``127.0.0.1``; both leaf
    certificates are signed by the CA and valid for one year. Keys are ECDSA P-256, written
    unencrypted with mode 0600; the CA key is not kept. For tests and local trials only.
    Returns paths keyed ``ca``, ``server_cert``, ``server_key``, ``client_cert``,
    ``client_key``.
    """
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError as exc:
        raise TLSConfigError(
            "make_self_signed needs the 'cryptography' package: pip install 'cryptography>=42' "
            "(or the dev extra: pip install -e '.[dev]')") from exc

    now = datetime.datetime.now(datetime.UTC)

    def name(common_name: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

    def issue(subject: x509.Name, key: ec.EllipticCurvePrivateKey, issuer: x509.Name,
              issuer_key: ec.EllipticCurvePrivateKey,
              extensions: list[tuple[x509.ExtensionType, bool]]) -> x509.Certificate:
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=365)))
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = name("resae-serve test CA")
    ca_cert = issue(ca_name, ca_key, ca_name, ca_key, [
        (x509.BasicConstraints(ca=True, path_length=0), True),
        (x509.KeyUsage(digital_signature=True, content_commitment=False,
                       key_encipherment=False, data_encipherment=False, key_agreement=False,
                       key_cert_sign=True, crl_sign=True, encipher_only=False,
                       decipher_only=False), True),
    ])
    dns_names = list(dict.fromkeys([hostname, "localhost"]))
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = issue(name(hostname), server_key, ca_name, ca_key, [
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (x509.SubjectAlternativeName(
            [x509.DNSName(dns) for dns in dns_names]
            + [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False),
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
    ])
    client_key = ec.generate_private_key(ec.SECP256R1())
    client_cert = issue(name("resae-serve test client"), client_key, ca_name, ca_key, [
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False),
    ])

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"ca": folder / "ca.pem", "server_cert": folder / "server.pem",
             "server_key": folder / "server.key", "client_cert": folder / "client.pem",
             "client_key": folder / "client.key"}
    for key_name, cert in (("ca", ca_cert), ("server_cert", server_cert),
                           ("client_cert", client_cert)):
        paths[key_name].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    for key_name, key in (("server_key", server_key), ("client_key", client_key)):
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        paths[key_name].touch(mode=0o600)
        paths[key_name].chmod(0o600)  # touch keeps the mode of an existing file
        paths[key_name].write_bytes(pem)
    logger.info("wrote a self-signed CA, server cert for %s and client cert into %s",
                hostname, folder)
    return paths
