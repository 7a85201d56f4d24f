"""Trade-finance attestations: signed document fingerprints and the alliance's double-financing check.

- :mod:`gateway.attest.documents`: document types, their fields, normalisation, the fingerprint input and
  the attestation claims (pure);
- :mod:`gateway.attest.records`: what the store holds (attestations, peers' fingerprints, hits);
- :mod:`gateway.attest.attestations`: the flow (check, record, sign) and verification;
- :mod:`gateway.attest.batches`: the signed fingerprint batch a member publishes, and its verification;
- :mod:`gateway.attest.alliance`: pulling the peers' batches (on demand and on a schedule).

See docs/trade-finance.md for the threat model.
"""
