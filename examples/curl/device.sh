#!/usr/bin/env bash
# Hard wallets: register two devices, load one with a signed voucher, pay offline from one to the
# other, and sync both. The devices are the gateway's simulator (sim-device.py keeps each in a file).
. "$(dirname "$0")/common.sh"
device() { ${PYTHON:-python3} "$(dirname "$0")/sim-device.py" "$@"; }
teller=$(login teller1)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

for name in payer payee; do
  info=$(device "$work/$name.json" info)
  cash=$([ "$name" = payer ] && echo 20000 || echo 0)
  registered=$(api POST /v1/devices "$teller" "$(jq --arg w "$(open_wallet "$teller" "$name" "$cash")" \
    '{wallet_id: $w, device_id, public_key_pem, model}' <<<"$info")")
  # The device keeps its certificate, signed by the gateway's `voucher` key.
  device "$work/$name.json" certify "$(jq -r .certificate <<<"$registered")" \
    "$(jq -r .issuer_public_key_pem <<<"$registered")" >/dev/null
  eval "${name}_id=$(jq -r .device_id <<<"$info")"
done

# Online: the wallet's money moves into the offline reserve; the device gets a signed voucher.
load=$(pay POST "/v1/devices/$payer_id/loads" "$teller" '{"amount_fen": 5000}')
device "$work/payer.json" load "$(jq -r .voucher <<<"$load")" >/dev/null

# Offline: device to device, no gateway involved.
payment=$(device "$work/payer.json" pay "$payee_id" 1200)
device "$work/payee.json" receive "$(jq -r .payment <<<"$payment")" "$(jq -r .certificate <<<"$payment")"

# Online again: each device uploads its signed log (CBOR) and stores the signed acknowledgement.
for name in payer payee; do
  id_var="${name}_id"
  device "$work/$name.json" export > "$work/$name.cbor"
  report=$(curl -sS --fail-with-body "$URL/v1/devices/${!id_var}/sync" -H "Authorization: Bearer $teller" \
             -H 'Content-Type: application/cbor' --data-binary @"$work/$name.cbor")
  device "$work/$name.json" ack "$(jq -r .ack <<<"$report")" >/dev/null
  eval "${name}_sync=\$report"
done
jq -n --argjson l "$load" --argjson a "$payer_sync" --argjson b "$payee_sync" '{load: $l, payer_sync: $a, payee_sync: $b}'
