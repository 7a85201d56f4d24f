#!/usr/bin/env bash
# An EIP-1559 transaction on Sepolia signed by the `evm-hot-wallet` key; the gateway allocates the
# nonce and returns the raw transaction, ready for eth_sendRawTransaction.
. "$(dirname "$0")/common.sh"
key_id=$(key evm-hot-wallet | jq -r .key_id)
pay POST /v1/evm/transactions "$BACKEND" "{
  \"key_id\": \"$key_id\", \"chain_id\": 11155111, \"type\": \"eip1559\", \"gas_limit\": 21000,
  \"max_fee_per_gas\": \"30000000000\", \"max_priority_fee_per_gas\": \"1000000000\",
  \"to\": \"0x1111111111111111111111111111111111111111\", \"value\": \"1000000000000000\"}" |
  jq '{from, nonce, tx_hash, raw_transaction}'
