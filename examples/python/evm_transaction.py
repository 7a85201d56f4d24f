"""An EIP-1559 transaction on Sepolia signed by the `evm-hot-wallet` key; the gateway allocates the
nonce and returns the raw transaction, ready for eth_sendRawTransaction."""

import json

from ecny import BACKEND, call, key

wallet = key("evm-hot-wallet")
signed = call("POST", "/v1/evm/transactions", BACKEND, {
    "key_id": wallet["key_id"], "chain_id": 11155111, "type": "eip1559", "gas_limit": 21000,
    "max_fee_per_gas": "30000000000", "max_priority_fee_per_gas": "1000000000",
    "to": "0x1111111111111111111111111111111111111111", "value": "1000000000000000"}, idempotent=True)
print(json.dumps({"from": signed["from"], "nonce": signed["nonce"], "tx_hash": signed["tx_hash"],
                  "raw_transaction": signed["raw_transaction"]}))
