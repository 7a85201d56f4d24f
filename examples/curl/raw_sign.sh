#!/usr/bin/env bash
# Raw signing: the SHA-256 digest of a message, signed by the HSM with the `raw-p256` key.
. "$(dirname "$0")/common.sh"
signer=$(key raw-p256)
digest=$(printf 'hello from the examples' | sha256sum | cut -d' ' -f1)
signed=$(api POST "/v1/keys/$(jq -r .key_id <<<"$signer")/sign" "$BACKEND" "{\"digest\": \"$digest\"}")
# `signature` is raw r||s (64 bytes), `der` the same as DER; verify with the key's public_key_pem:
#   openssl dgst -sha256 -verify key.pem -signature <(xxd -r -p <<<"$der") <<<"message"
jq -n --arg digest "$digest" --argjson signed "$signed" --argjson key "$signer" \
  '{digest: $digest, signature: $signed.signature, der: $signed.der, public_key_pem: $key.public_key_pem}'
