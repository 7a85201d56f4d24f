# Shared by the curl examples (source it): the gateway's URL, the credentials `make run` made, and
# small wrappers around curl and jq. Every call fails loudly on an HTTP error (--fail-with-body).
set -euo pipefail
URL=${ECNY_URL:-http://127.0.0.1:8700}
CREDENTIALS=${ECNY_CREDENTIALS:-var/dev-credentials.json}
BACKEND=$(jq -r .backend_api_key "$CREDENTIALS")   # an API client with role backend

# api METHOD PATH TOKEN [JSON]: one JSON request, the answer on stdout.
api() {
  curl -sS --fail-with-body -X "$1" "$URL$2" -H "Authorization: Bearer $3" \
       -H 'Content-Type: application/json' ${4:+--data "$4"}
}
# pay METHOD PATH TOKEN JSON: the same with a fresh Idempotency-Key (needed where money moves; a
# retry with the same key is answered from the first result, never done twice).
pay() {
  curl -sS --fail-with-body -X "$1" "$URL$2" -H "Authorization: Bearer $3" \
       -H 'Content-Type: application/json' -H "Idempotency-Key: $(cat /proc/sys/kernel/random/uuid)" --data "$4"
}
# login USER: a teller-UI session token for one of the development users.
login() {
  jq -n --arg u "$1" --arg p "$(jq -r --arg u "$1" '.users[$u]' "$CREDENTIALS")" '{username: $u, password: $p}' |
    curl -sS --fail-with-body "$URL/v1/sessions" -H 'Content-Type: application/json' --data @- | jq -r .token
}
# key LABEL: the key document with that label (dev-init made raw-p256, evm-hot-wallet, …).
key() { api GET /v1/keys "$BACKEND" | jq --arg l "$1" '.keys[] | select(.label == $l)'; }
# open_wallet TELLER_TOKEN NAME [CASH_FEN]: a tier-2 wallet's id, with cash paid in.
open_wallet() {
  local id
  id=$(api POST /v1/wallets "$1" "{\"holder_name\": \"$2\", \"phone\": \"13800138000\", \"tier\": 2, \"kind\": \"personal\"}" |
       jq -r .wallet_id)
  if [ "${3:-0}" -gt 0 ]; then pay POST "/v1/wallets/$id/cash-in" "$1" "{\"amount_fen\": $3}" >/dev/null; fi
  echo "$id"
}
