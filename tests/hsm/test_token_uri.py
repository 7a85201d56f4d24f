"""A profile that names its token by PKCS#11 URI (RFC 7512) opens exactly that token, on a real SoftHSM token."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.auth.roles import Role
from gateway.hsm.profile import load_named_profile, profiles_dir
from tests.api.support import assert_problem
from tests.conftest import Token, make_settings, start_gateway

pytestmark = pytest.mark.softhsm


def _serial(token: Token) -> str:
    import pkcs11  # read the token's identity the way an operator's tool would

    found = pkcs11.lib(load_named_profile("softhsm").module.path).get_token(token_label=token.label)
    serial = found.serial
    return (serial.decode() if isinstance(serial, bytes) else str(serial)).strip()


def _profile_with_uri(tmp_path: Path, uri: str) -> Path:
    text = (profiles_dir() / "softhsm.toml").read_text()
    start = text.index("[token]")
    end = text.index("\n[", start + 1)
    path = tmp_path / "softhsm-by-uri.toml"
    path.write_text(text[:start] + f'[token]\nuri = "{uri}"\n' + text[end:])
    return path


async def _generate(softhsm_token: Token, tmp_path: Path, uri: str, name: str) -> int:
    settings = make_settings(softhsm_token, f"sqlite:///{tmp_path / f'{name}.db'}")
    (tmp_path / name).mkdir()
    settings.hsm.profile = str(_profile_with_uri(tmp_path / name, uri))
    settings.hsm.token_label = None  # the profile's URI decides
    gateway = await start_gateway(settings)
    try:
        response = await gateway.client.post("/v1/keys", json={"label": f"by-uri-{name}", "algorithm": "ecdsa-p256",
                                                               "usage": ["raw"]}, headers=gateway.auth(Role.ADMIN))
        if response.status != 201:
            await assert_problem(response, 503, "hsm-unavailable")
        return response.status
    finally:
        await gateway.client.close()


async def test_a_token_named_by_label_and_serial_is_opened(softhsm_token: Token, tmp_path: Path) -> None:
    """Positive control: `pkcs11:token=…;serial=…;manufacturer=…` opens the token that has all of them."""
    uri = f"pkcs11:token={softhsm_token.label};serial={_serial(softhsm_token)};manufacturer=SoftHSM%20project"
    assert await _generate(softhsm_token, tmp_path, uri, "right") == 201


async def test_a_token_with_the_right_label_but_another_serial_is_not_opened(softhsm_token: Token,
                                                                            tmp_path: Path) -> None:
    """Threat: a profile that names its token by label and serial signs with another token of the same label."""
    uri = f"pkcs11:token={softhsm_token.label};serial=0000000000000000"
    assert await _generate(softhsm_token, tmp_path, uri, "wrong") == 503
