"""TLS and mTLS (docs/spec.md §5): a second gateway on the test token, served over HTTPS with a client CA.

A client certificate whose subject CN is in ``server.mtls_identities`` authenticates as that API
client without a bearer key; any other certificate is 401; no certificate, no TLS session.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from multidict import CIMultiDict

from tests.api.support import ServedGateway, serve_gateway
from tests.conftest import Token, make_settings

pytestmark = pytest.mark.softhsm

MAPPED_CN = "branch-backend-01"
UNMAPPED_CN = "stranger-01"


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path
    stranger_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> Path:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)
    return path


def _issue(
    directory: Path, stem: str, common_name: str, issuer: x509.Name, issuer_key: ec.EllipticCurvePrivateKey,
    *, server: bool,
) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.IPv4Address("127.0.0.1"))]), critical=False
        )
    certificate = builder.sign(issuer_key, hashes.SHA256())
    cert_path = directory / f"{stem}.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return cert_path, _write_key(directory / f"{stem}-key.pem", key)


def make_pki(directory: Path) -> Pki:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("ecny test CA")
    now = datetime.datetime.now(datetime.UTC)
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_path = directory / "ca.pem"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    server_cert, server_key = _issue(directory, "server", "127.0.0.1", ca_name, ca_key, server=True)
    client_cert, client_key = _issue(directory, "client", MAPPED_CN, ca_name, ca_key, server=False)
    stranger_cert, stranger_key = _issue(directory, "stranger", UNMAPPED_CN, ca_name, ca_key, server=False)
    return Pki(ca_path, server_cert, server_key, client_cert, client_key, stranger_cert, stranger_key)


@dataclass
class Tls:
    served: ServedGateway
    pki: Pki

    def context(self, cert: Path | None = None, key: Path | None = None,
                maximum: ssl.TLSVersion = ssl.TLSVersion.MAXIMUM_SUPPORTED) -> ssl.SSLContext:
        """A client context that trusts the test CA (and so checks the server's 127.0.0.1 SAN)."""
        context = ssl.create_default_context(cafile=str(self.pki.ca))
        context.maximum_version = maximum
        if cert is not None:
            context.load_cert_chain(cert, key)
        return context

    def mapped(self) -> ssl.SSLContext:
        return self.context(self.pki.client_cert, self.pki.client_key)

    async def get(self, path: str, context: ssl.SSLContext, headers: dict[str, str] | None = None,
                  method: str = "GET", json: object = None) -> tuple[int, CIMultiDict[str], object]:
        async with aiohttp.ClientSession() as session, session.request(
            method, self.served.url + path, ssl=context, headers=headers, json=json
        ) as response:
            body = await response.json(content_type=None)
            return response.status, response.headers.copy(), body


@pytest_asyncio.fixture(scope="module")
async def tls(softhsm_token: Token, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Tls]:
    directory = tmp_path_factory.mktemp("tls")
    pki = make_pki(directory)
    settings = make_settings(
        softhsm_token, f"sqlite:///{directory / 'gateway.db'}",
        server={"tls_cert": pki.server_cert, "tls_key": pki.server_key, "tls_client_ca": pki.ca,
                "mtls_identities": {MAPPED_CN: "test-backend"}},
    )
    served = await serve_gateway(settings)
    assert served.url.startswith("https://")
    try:
        yield Tls(served, pki)
    finally:
        await served.close()


async def test_https_serves_the_api(tls: Tls) -> None:
    status, headers, body = await tls.get("/healthz", tls.mapped())
    assert (status, body) == (200, {"status": "ok"})
    assert headers["X-Request-Id"]


@pytest.mark.parametrize("maximum", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.MAXIMUM_SUPPORTED],
                         ids=["tls1.2", "tls1.3"])
async def test_no_client_certificate_no_tls_session(tls: Tls, maximum: ssl.TLSVersion) -> None:
    # Refused in the handshake (TLS 1.2) or right after it (TLS 1.3): either way no HTTP answer.
    with pytest.raises(aiohttp.ClientConnectionError):
        await tls.get("/healthz", tls.context(maximum=maximum))
    # The same client with its certificate gets through: the certificate was what was missing.
    status, _, _ = await tls.get("/healthz", tls.context(tls.pki.client_cert, tls.pki.client_key, maximum=maximum))
    assert status == 200


async def test_handshake_itself_is_refused_without_certificate(tls: Tls) -> None:
    """With TLS 1.2 the server's refusal comes in the handshake, before any HTTP is sent."""
    host, port = "127.0.0.1", int(tls.served.url.rsplit(":", 1)[1])
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        _, writer = await asyncio.open_connection(
            host, port, ssl=tls.context(maximum=ssl.TLSVersion.TLSv1_2)
        )
        writer.close()


async def test_server_certificate_is_checked_by_clients(tls: Tls) -> None:
    """The client side of the test is real TLS: a client without the CA refuses the server."""
    context = ssl.create_default_context()
    context.load_cert_chain(tls.pki.client_cert, tls.pki.client_key)
    with pytest.raises(aiohttp.ClientConnectorCertificateError):
        await tls.get("/healthz", context)


async def test_mapped_certificate_authenticates_as_its_client(tls: Tls) -> None:
    status, _, body = await tls.get("/v1/keys", tls.mapped())
    assert status == 200, body
    assert isinstance(body, dict) and body["keys"] == []


async def test_mapped_certificate_has_only_its_clients_role(tls: Tls) -> None:
    status, _, body = await tls.get("/v1/audit", tls.mapped())
    assert status == 403, body
    assert isinstance(body, dict) and body["type"].endswith("/forbidden")
    status, _, body = await tls.get(
        "/v1/keys", tls.mapped(), method="POST", json={"label": "mtls-key", "algorithm": "ed25519", "usage": ["raw"]}
    )
    assert status == 403, body
    assert isinstance(body, dict) and body["type"].endswith("/forbidden")


async def test_unmapped_certificate_is_unauthenticated(tls: Tls) -> None:
    status, headers, body = await tls.get("/v1/keys", tls.context(tls.pki.stranger_cert, tls.pki.stranger_key))
    assert status == 401, body
    assert isinstance(body, dict) and body["type"].endswith("/unauthenticated")
    assert headers["Content-Type"] == "application/problem+json"
    assert "WWW-Authenticate" in headers
    # Public endpoints need no identity, so the unmapped certificate still reaches them.
    status, _, _ = await tls.get("/healthz", tls.context(tls.pki.stranger_cert, tls.pki.stranger_key))
    assert status == 200


async def test_bearer_key_over_mtls_takes_precedence(tls: Tls) -> None:
    admin = {"Authorization": f"Bearer {tls.served.api_keys['admin']}"}
    status, _, body = await tls.get("/v1/audit", tls.context(tls.pki.stranger_cert, tls.pki.stranger_key), admin)
    assert status == 200, body
    status, _, body = await tls.get("/v1/keys", tls.mapped(), {"Authorization": "Bearer garbage"})
    assert status == 401, body  # a bad bearer key is not rescued by the certificate


async def test_revoked_client_loses_its_certificate_identity(tls: Tls) -> None:
    from gateway.auth.credentials import revoke_client
    from gateway.runtime import RUNTIME

    runtime = tls.served.runner.app[RUNTIME]
    assert (await tls.get("/v1/keys", tls.mapped()))[0] == 200
    await runtime.database.write(lambda tx: revoke_client(tx, "test-backend"))
    try:
        status, _, body = await tls.get("/v1/keys", tls.mapped())
        assert status == 401, body
    finally:  # the module's other tests use this client
        await runtime.database.write(
            lambda tx: tx.execute("UPDATE clients SET revoked_at = NULL WHERE name = ?", ("test-backend",))
        )
