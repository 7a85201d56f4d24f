#!/usr/bin/env bash
# An EIP-712 document: an EIP-2612 Permit of 5 USDC on Sepolia, signed by `evm-hot-wallet`.
# The gateway reads it as an `approve` of the token and applies that token's policy.
. "$(dirname "$0")/common.sh"
wallet=$(key evm-hot-wallet)
permit=$(jq -n --arg owner "$(jq -r .address <<<"$wallet")" --argjson deadline $(( $(date +%s) + 3600 )) '{
  types: {
    EIP712Domain: [{name: "name", type: "string"}, {name: "version", type: "string"},
                   {name: "chainId", type: "uint256"}, {name: "verifyingContract", type: "address"}],
    Permit: [{name: "owner", type: "address"}, {name: "spender", type: "address"}, {name: "value", type: "uint256"},
             {name: "nonce", type: "uint256"}, {name: "deadline", type: "uint256"}]},
  primaryType: "Permit",
  domain: {name: "USDC", version: "2", chainId: 11155111,
           verifyingContract: "0x1c7D4B196Cb0C7B01d743Fbc6116a902379C7238"},
  message: {owner: $owner, spender: "0x2222222222222222222222222222222222222222", value: 5000000, nonce: 0,
            deadline: $deadline}}')
signed=$(api POST /v1/evm/typed-data "$BACKEND" \
  "$(jq -n --arg k "$(jq -r .key_id <<<"$wallet")" --argjson p "$permit" '{key_id: $k, chain_id: 11155111, typed_data: $p}')")
jq -n --argjson p "$permit" --argjson s "$signed" '{typed_data: $p, signature: $s.signature, signer: $s.signer, intent: $s.intent}'
