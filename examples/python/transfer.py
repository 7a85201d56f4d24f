"""A transfer between two wallets, once as JSON and once as CBOR; each comes back with a signed
COSE_Sign1 envelope (`envelope`, base64) made by the `ecny` key."""

import json

import cbor2
from ecny import BACKEND, call, login, open_wallet

teller = login("teller1")
payer = open_wallet(teller, "Payer", cash_fen=10_000)  # ¥100.00
payee = open_wallet(teller, "Payee")

as_json = call("POST", "/v1/transfers", BACKEND,
               {"from_wallet": payer, "to_wallet": payee, "amount_fen": 1_234, "memo": "lunch"}, idempotent=True)
as_cbor = call("POST", "/v1/transfers", BACKEND,
               data=cbor2.dumps({"from_wallet": payer, "to_wallet": payee, "amount_fen": 766, "memo": "tea"}),
               content_type="application/cbor", idempotent=True)
balance = call("GET", f"/v1/wallets/{payee}", teller)["balance_fen"]
print(json.dumps({"json": as_json, "cbor": as_cbor, "payee_balance_fen": balance}))
