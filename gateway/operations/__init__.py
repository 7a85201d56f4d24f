"""The application layer's shared machinery, below the HTTP API and above the store and the HSM.

- :mod:`gateway.operations.idempotency`: Idempotency-Key records (record, complete, replay), kept in the
  store next to the work they answer for;
- :mod:`gateway.operations.signed`: the two-phase signed operation (check and record in one
  transaction with the idempotency record → commit → sign through the HSM → store the signature and
  the answer), which transfers, voucher loads, EVM transactions and EIP-712 requests all go through;
- :mod:`gateway.operations.raw`: raw and batch signatures, a *signed record* in one phase (check → sign →
  one write of the audit entry and the answer → answer), since there is nothing to record before signing.

Nothing here knows HTTP: an answer is a status, a media type and a body, rendered by ``gateway/api``.
"""
