"""Maker-checker: a teller opens a tier-1 wallet (no limits), which waits for a supervisor; the
supervisor reads the approval and approves exactly what was asked (its payload_hash)."""

import json

from ecny import call, login

teller, supervisor = login("teller1"), login("supervisor1")
opened = call("POST", "/v1/wallets", teller,
              {"holder_name": "Big Corp", "phone": "13800138000", "tier": 1, "kind": "corporate"})
pending = opened["tier_approval"]  # the wallet is open at tier 2 until a second person approves tier 1
approval = call("GET", f"/v1/approvals/{pending['approval_id']}", supervisor)
decided = call("POST", f"/v1/approvals/{approval['approval_id']}/approve", supervisor,
               {"payload_hash": approval["payload_hash"], "note": "documents checked"})
wallet = call("GET", f"/v1/wallets/{opened['wallet_id']}", teller)
print(json.dumps({"approval": decided, "tier": wallet["tier"]}))
