#!/usr/bin/env bash
# A transfer between two wallets, once as JSON and once as CBOR; each comes back with a signed
# COSE_Sign1 envelope (`envelope`, base64) made by the `ecny` key.
. "$(dirname "$0")/common.sh"
teller=$(login teller1)
payer=$(open_wallet "$teller" Payer 10000)   # ¥100.00
payee=$(open_wallet "$teller" Payee)

as_json=$(pay POST /v1/transfers "$BACKEND" \
  "{\"from_wallet\": \"$payer\", \"to_wallet\": \"$payee\", \"amount_fen\": 1234, \"memo\": \"lunch\"}")
# CBOR in: the same fields, encoded here by cbor2 (any CBOR encoder does); the answer is JSON.
as_cbor=$(jq -n --arg f "$payer" --arg t "$payee" '{from_wallet: $f, to_wallet: $t, amount_fen: 766, memo: "tea"}' |
  ${PYTHON:-python3} -c 'import cbor2, json, sys; sys.stdout.buffer.write(cbor2.dumps(json.load(sys.stdin)))' |
  curl -sS --fail-with-body "$URL/v1/transfers" -H "Authorization: Bearer $BACKEND" \
       -H 'Content-Type: application/cbor' -H "Idempotency-Key: $(cat /proc/sys/kernel/random/uuid)" --data-binary @-)
balance=$(api GET "/v1/wallets/$payee" "$teller" | jq .balance_fen)
jq -n --argjson j "$as_json" --argjson c "$as_cbor" --argjson b "$balance" '{json: $j, cbor: $c, payee_balance_fen: $b}'
