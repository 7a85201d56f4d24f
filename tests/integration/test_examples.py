"""examples/: every script, curl and Python, run as a user runs it against a live gateway process
(provisioned by `dev-init`, as `make run` does), its output checked with independent oracles —
cryptography for raw signatures, pycose for transfer envelopes, eth-account for EVM signatures.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, decode_dss_signature
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from eth_account import Account
from eth_account.messages import encode_typed_data

from tests.conftest import ROOT, Token
from tests.device.flows import verify_with_pycose
from tests.procs import GatewayProcess

pytestmark = [pytest.mark.softhsm, pytest.mark.slow]

LABEL = "ecny-examples"
EXAMPLES = ROOT / "examples"
FLOWS = ["raw_sign", "transfer", "approval", "evm_transaction", "typed_data", "device"]


class Live:
    def __init__(self, gateway: GatewayProcess, credentials_file: Path) -> None:
        self.gateway = gateway
        self.credentials_file = credentials_file
        self.credentials = json.loads(credentials_file.read_text())

    def keys(self) -> list[dict[str, Any]]:
        request = urllib.request.Request(self.gateway.url + "/v1/keys",
                                         headers={"Authorization": f"Bearer {self.credentials['backend_api_key']}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            found: list[dict[str, Any]] = json.loads(response.read())["keys"]
            return found

    def run(self, script: Path) -> dict[str, Any]:
        env = {**os.environ, "ECNY_URL": self.gateway.url, "ECNY_CREDENTIALS": str(self.credentials_file),
               "PYTHON": sys.executable, "PYTHONPATH": str(ROOT)}
        command = ["bash", str(script)] if script.suffix == ".sh" else [sys.executable, str(script)]
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, cwd=script.parent)
        assert result.returncode == 0, f"{script.name}: {result.stdout[-2000:]}{result.stderr[-2000:]}"
        document: dict[str, Any] = json.loads(result.stdout)
        return document


@pytest.fixture(scope="module")
def live(softhsm_token: Token, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    for tool in ("curl", "jq"):
        if shutil.which(tool) is None:
            pytest.fail(f"the curl examples need {tool}: `make system` installs it")
    subprocess.run([str(ROOT / "softhsm" / "init-token.sh"), str(softhsm_token.directory), LABEL], check=True,
                   capture_output=True)
    var = tmp_path_factory.mktemp("examples")
    gateway = GatewayProcess(var / "var", softhsm_token.conf, LABEL, softhsm_token.directory / f"{LABEL}.user-pin",
                             f"sqlite:///{var / 'gw.db'}")
    gateway.provision()
    gateway.start()
    try:
        yield Live(gateway, gateway.var / "dev-credentials.json")
    finally:
        gateway.stop()


def _raw_sign(live: Live, out: dict[str, Any]) -> None:
    public = load_pem_public_key(out["public_key_pem"].encode())
    assert isinstance(public, ec.EllipticCurvePublicKey)
    der = bytes.fromhex(out["der"])
    public.verify(der, bytes.fromhex(out["digest"]), ec.ECDSA(Prehashed(hashes.SHA256())))
    r, s = decode_dss_signature(der)
    assert bytes.fromhex(out["signature"]) == r.to_bytes(32, "big") + s.to_bytes(32, "big")


def _transfer(live: Live, out: dict[str, Any]) -> None:
    keys = {key["key_id"]: key for key in live.keys()}
    for encoding, amount in (("json", 1234), ("cbor", 766)):
        transfer = out[encoding]
        assert transfer["status"] == "posted" and transfer["amount_fen"] == amount
        claims = verify_with_pycose(base64.b64decode(transfer["envelope"]), keys[transfer["kid"]]["public_key_pem"])
        assert amount in claims.values()
    assert out["payee_balance_fen"] == 2000


def _approval(live: Live, out: dict[str, Any]) -> None:
    approval = out["approval"]
    assert approval["status"] == "executed" and approval["kind"] == "wallet_tier"
    assert approval["requested_by"] == "user:teller1" and approval["decided_by"] == "user:supervisor1"
    assert approval["result"]["tier"] == 1 and out["tier"] == 1


def _evm_transaction(live: Live, out: dict[str, Any]) -> None:
    wallet = next(key for key in live.keys() if key["label"] == "evm-hot-wallet")
    assert Account.recover_transaction(out["raw_transaction"]) == out["from"] == wallet["address"]


def _typed_data(live: Live, out: dict[str, Any]) -> None:
    wallet = next(key for key in live.keys() if key["label"] == "evm-hot-wallet")
    recovered = Account.recover_message(encode_typed_data(full_message=out["typed_data"]),
                                        signature=bytes.fromhex(out["signature"].removeprefix("0x")))
    assert recovered == out["signer"] == wallet["address"]


def _device(live: Live, out: dict[str, Any]) -> None:
    assert out["load"]["amount_fen"] == 5000 and out["load"]["voucher"]
    assert out["payer_sync"]["payments"]["new"] == 1
    assert out["payee_sync"]["posted_fen"] == 1200
    assert out["payer_sync"]["ack"] and out["payee_sync"]["ack"]


CHECKS: dict[str, Callable[[Live, dict[str, Any]], None]] = {
    "raw_sign": _raw_sign, "transfer": _transfer, "approval": _approval, "evm_transaction": _evm_transaction,
    "typed_data": _typed_data, "device": _device,
}


def test_every_flow_has_both_examples() -> None:
    """Documentation with gaps: each main flow has a curl and a Python example, and each is checked here."""
    assert set(CHECKS) == set(FLOWS)
    for flow in FLOWS:
        assert (EXAMPLES / "curl" / f"{flow}.sh").is_file() and (EXAMPLES / "python" / f"{flow}.py").is_file()


@pytest.mark.parametrize("language", ["curl", "python"])
@pytest.mark.parametrize("flow", FLOWS)
def test_example_runs_against_a_live_gateway(live: Live, flow: str, language: str) -> None:
    """Documentation that drifted from the API: the example runs unchanged against a live gateway and
    what it prints verifies with an independent implementation."""
    script = EXAMPLES / language / (f"{flow}.sh" if language == "curl" else f"{flow}.py")
    CHECKS[flow](live, live.run(script))
