"""An EIP-712 document: an EIP-2612 Permit of 5 USDC on Sepolia, signed by `evm-hot-wallet`.
The gateway reads it as an `approve` of the token and applies that token's policy."""

import json
import time

from ecny import BACKEND, call, key

wallet = key("evm-hot-wallet")
usdc = "0x1c7D4B196Cb0C7B01d743Fbc6116a902379C7238"  # Sepolia USDC, in the shipped chain registry
permit = {
    "types": {
        "EIP712Domain": [{"name": "name", "type": "string"}, {"name": "version", "type": "string"},
                         {"name": "chainId", "type": "uint256"}, {"name": "verifyingContract", "type": "address"}],
        "Permit": [{"name": "owner", "type": "address"}, {"name": "spender", "type": "address"},
                   {"name": "value", "type": "uint256"}, {"name": "nonce", "type": "uint256"},
                   {"name": "deadline", "type": "uint256"}],
    },
    "primaryType": "Permit",
    "domain": {"name": "USDC", "version": "2", "chainId": 11155111, "verifyingContract": usdc},
    "message": {"owner": wallet["address"], "spender": "0x2222222222222222222222222222222222222222",
                "value": 5_000_000, "nonce": 0, "deadline": int(time.time()) + 3600},
}
signed = call("POST", "/v1/evm/typed-data", BACKEND,
              {"key_id": wallet["key_id"], "chain_id": 11155111, "typed_data": permit}, idempotent=True)
print(json.dumps({"typed_data": permit, "signature": signed["signature"], "signer": signed["signer"],
                  "intent": signed["intent"]}))
