"""The Attestations screen against a real gateway: search by number, verify an attestation file, and the
duplicate-financing hits."""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
from pathlib import Path
from typing import Any

from gateway.auth.roles import Role
from gateway.errors import AmbiguousKey
from tests.api.support import runtime
from tests.conftest import Gateway
from tests.tui.conftest import cell_texts, has_notification, login, screen_text, teller_app, type_text, wait_for
from tui.screens.attestations import AttestationsScreen

PARTY = {"name": "TUI Trading Co.", "tax_id": "91310000MA1FL8XQ3X"}


async def _member(gateway: Gateway) -> None:
    """Make the TUI gateway an alliance member (member id, HMAC key, attest key) once."""
    if gateway.settings.alliance.member_id:
        return
    pool: Any = runtime(gateway).signer
    try:
        await pool.import_secret(gateway.settings.alliance.hmac_key_label, os.urandom(32))
    except AmbiguousKey:
        pass
    response = await gateway.client.post("/v1/keys", json={"label": "tui-attest", "algorithm": "ecdsa-p256",
                                                           "usage": ["attest"]}, headers=gateway.auth(Role.ADMIN))
    assert response.status in (201, 409), await response.text()
    gateway.settings.alliance.member_id = "TUI-BANK"


async def _attest(gateway: Gateway, number: str) -> tuple[int, dict[str, Any]]:
    body = {"document_type": "invoice", "document_sha256": hashlib.sha256(number.encode()).hexdigest(),
            "purpose": "finance",
            "fields": {"issuer": PARTY, "number": number, "issue_date": "2026-10-01", "amount_minor": 1_234_567,
                       "currency": "CNY", "seller": PARTY, "buyer": {"name": "Buyer", "tax_id": "NL859412345B01"}}}
    response = await gateway.client.post("/v1/attestations", json=body, headers=gateway.auth(Role.BACKEND))
    return response.status, await response.json()


async def test_search_verify_and_hits(tui_gateway: Gateway, tmp_path: Path) -> None:
    await _member(tui_gateway)
    number = f"TUI{secrets.token_hex(4).upper()}"
    status, made = await _attest(tui_gateway, number)
    assert status == 201, made
    assert (await _attest(tui_gateway, number))[0] == 409  # a duplicate hit
    raw = tmp_path / "attestation.cose"
    raw.write_bytes(base64.b64decode(made["attestation"]))
    forged = bytearray(raw.read_bytes())
    forged[-1] ^= 1  # the signature's last byte
    bad = tmp_path / "forged.cose"
    bad.write_bytes(bytes(forged))

    app = teller_app(tui_gateway)
    async with app.run_test(size=(120, 40)) as pilot:
        await login(pilot, "teller1")
        await pilot.press("b")
        await wait_for(pilot, lambda: isinstance(app.screen, AttestationsScreen), what="attestations screen")
        await wait_for(pilot, lambda: any(number in row[2] for row in cell_texts(app, "#hits-table")),
                       what="the duplicate hit")
        await type_text(pilot, number.lower())
        await pilot.press("enter")
        await wait_for(pilot, lambda: cell_texts(app, "#attestation-table") != [], what="search results")
        row = cell_texts(app, "#attestation-table")[0]
        assert row[0] == "invoice" and row[2] == number and row[4] == "12,345.67 CNY" and row[5] == "TUI-BANK"

        await pilot.press("v")
        await type_text(pilot, str(raw))
        await pilot.press("enter")
        await wait_for(pilot, lambda: "Valid" in screen_text(app), what="verdict")
        assert "NOT valid" not in screen_text(app)
        input_ = app.screen.query_one("#verify-file")
        input_.value = str(bad)  # type: ignore[attr-defined]
        await pilot.press("enter")
        await wait_for(pilot, lambda: "NOT valid (bad-signature)" in screen_text(app), what="forged verdict")

        input_.value = str(tmp_path / "missing.cose")  # type: ignore[attr-defined]
        await pilot.press("enter")
        await wait_for(pilot, lambda: has_notification(app, "cannot read"), what="missing-file notice")
