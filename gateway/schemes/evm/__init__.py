"""EVM transactions, ERC-20 calldata and EIP-712 typed data — pure functions, no I/O.

What the gateway signs for stablecoins (docs/spec.md §6), one module each:

- :mod:`~gateway.schemes.evm.transactions` — EIP-1559 (type 2 inside an EIP-2718 envelope) and legacy
  EIP-155 transactions, RLP-encoded with ``rlp``; the signing hash is keccak-256 (``eth-hash``) of the
  signing payload. The HSM signs that 32-byte hash with ``CKM_ECDSA`` on secp256k1 and returns raw r‖s.
- :mod:`~gateway.schemes.evm.signatures` — the HSM's r‖s made low-S (EIP-2) with its recovery id
  found by public-key recovery (``coincurve``), for transactions and typed data alike.
- :mod:`~gateway.schemes.evm.erc20` — ``transfer``, ``approve``, ``mint`` and ``burn`` calldata (``eth-abi``).
- :mod:`~gateway.schemes.evm.eip712` — EIP-712 typed data hashing, strict and bounded.
- :mod:`~gateway.schemes.evm.values` — addresses (EIP-55) and amounts as the API takes them.

Every malformed input raises a :class:`gateway.errors.GatewayError` subclass (400).
"""
