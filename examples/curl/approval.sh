#!/usr/bin/env bash
# Maker-checker: a teller opens a tier-1 wallet (no limits), which waits for a supervisor; the
# supervisor reads the approval and approves exactly what was asked (its payload_hash).
. "$(dirname "$0")/common.sh"
teller=$(login teller1)
supervisor=$(login supervisor1)
opened=$(api POST /v1/wallets "$teller" '{"holder_name": "Big Corp", "phone": "13800138000", "tier": 1, "kind": "corporate"}')
approval_id=$(jq -r .tier_approval.approval_id <<<"$opened")   # open at tier 2 until approved
approval=$(api GET "/v1/approvals/$approval_id" "$supervisor")
decided=$(api POST "/v1/approvals/$approval_id/approve" "$supervisor" \
  "$(jq '{payload_hash, note: "documents checked"}' <<<"$approval")")
tier=$(api GET "/v1/wallets/$(jq -r .wallet_id <<<"$opened")" "$teller" | jq .tier)
jq -n --argjson a "$decided" --argjson t "$tier" '{approval: $a, tier: $t}'
