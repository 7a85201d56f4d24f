"""The few lines every Python example shares: where the gateway is, the credentials `make run` made,
and one HTTP call (standard library only)."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

URL = os.environ.get("ECNY_URL", "http://127.0.0.1:8700")
CREDENTIALS = json.loads(Path(os.environ.get("ECNY_CREDENTIALS", "var/dev-credentials.json")).read_text())
BACKEND = CREDENTIALS["backend_api_key"]  # an API client with role backend


def call(method: str, path: str, token: str, body: Any = None, data: bytes | None = None,
         content_type: str = "application/json", idempotent: bool = False) -> Any:
    """One request; returns the decoded JSON answer, or raises with the problem document."""
    headers = {"Authorization": f"Bearer {token}", "Content-Type": content_type}
    if idempotent:  # POSTs that move money take an Idempotency-Key: retrying with it is safe
        headers["Idempotency-Key"] = str(uuid.uuid4())
    if body is not None:
        data = json.dumps(body).encode()
    request = urllib.request.Request(URL + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        raise SystemExit(f"{method} {path}: {error.code} {error.read().decode()}") from None


def login(username: str) -> str:
    """A teller-UI session token for one of the development users."""
    body = {"username": username, "password": CREDENTIALS["users"][username]}
    request = urllib.request.Request(URL + "/v1/sessions", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request) as response:
        return str(json.loads(response.read())["token"])


def key(label: str) -> dict[str, Any]:
    """A key by its label (dev-init made `raw-p256`, `evm-hot-wallet`, …)."""
    return next(k for k in call("GET", "/v1/keys", BACKEND)["keys"] if k["label"] == label)


def open_wallet(teller: str, name: str, cash_fen: int = 0) -> str:
    """A tier-2 wallet opened by a teller, with cash paid in."""
    wallet = call("POST", "/v1/wallets", teller, {"holder_name": name, "phone": "13800138000", "tier": 2,
                                                  "kind": "personal"})
    if cash_fen:
        call("POST", f"/v1/wallets/{wallet['wallet_id']}/cash-in", teller, {"amount_fen": cash_fen}, idempotent=True)
    return str(wallet["wallet_id"])
