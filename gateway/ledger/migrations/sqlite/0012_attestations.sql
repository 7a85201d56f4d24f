-- Trade-finance attestations and the alliance's double-financing check (docs/trade-finance.md).
-- attestations: what this bank attested. A `finance` attestation carries the document's fingerprint
-- (HMAC-SHA256 under the alliance key, hex) and a place in this bank's published fingerprint feed
-- (publication_seq, gap-free, allocated under a lock so that commits happen in seq order). The UNIQUE
-- fingerprint is the last word on "financed once here": two concurrent finances of one document cannot
-- both commit. A notice has neither (NULL, which UNIQUE allows many times).
CREATE TABLE attestations (
    attestation_id    TEXT PRIMARY KEY,
    document_type     TEXT NOT NULL,          -- invoice | bill_of_lading | customs_declaration | ...
    purpose           TEXT NOT NULL,          -- finance | notice
    document_number   TEXT NOT NULL,          -- normalised
    issuer_tax_id     TEXT NOT NULL,          -- normalised
    document_sha256   TEXT NOT NULL,          -- hex of the document's SHA-256
    amount_minor      INTEGER NOT NULL,       -- integer minor units of currency
    currency          TEXT NOT NULL,
    fields            TEXT NOT NULL,          -- JSON: the normalised fields as attested
    fingerprint       TEXT UNIQUE,            -- finance only
    publication_seq   INTEGER UNIQUE,         -- finance only: position in GET /v1/alliance/fingerprints
    key_id            TEXT NOT NULL,          -- the `attest` key that signs it
    claims            BLOB NOT NULL,          -- the canonical CBOR payload, fixed before signing
    envelope          BLOB,                   -- the COSE_Sign1, stored after signing (NULL until then)
    created_by        TEXT NOT NULL,
    created_at        TEXT NOT NULL
);
CREATE INDEX attestations_number ON attestations (document_number, issuer_tax_id);
CREATE INDEX attestations_unsigned ON attestations (created_at) WHERE envelope IS NULL;

-- Fingerprints other members financed, as their signed batches said. (member_id, seq) is the member's own
-- feed position: storing a batch twice changes nothing. A fingerprint may appear under two members
-- (a double financing that slipped through the sync window): both rows are kept as evidence.
CREATE TABLE alliance_fingerprints (
    member_id     TEXT NOT NULL,
    seq           INTEGER NOT NULL,
    fingerprint   TEXT NOT NULL,
    financed_at   TEXT NOT NULL,              -- ISO-8601 UTC, as the member signed it
    received_at   TEXT NOT NULL,
    PRIMARY KEY (member_id, seq)
);
CREATE INDEX alliance_fingerprints_fp ON alliance_fingerprints (fingerprint);

-- One row per peer: how far its feed has been read (the cursor a replayed old batch cannot rewind).
CREATE TABLE alliance_peers (
    member_id        TEXT PRIMARY KEY,
    feed_cursor        INTEGER NOT NULL DEFAULT 0,   -- last seq stored
    head             INTEGER NOT NULL DEFAULT 0,   -- the peer's head when last asked
    last_issued_at   TEXT NOT NULL DEFAULT '',     -- issued_at of the last accepted batch
    last_sync_at     TEXT NOT NULL DEFAULT '',     -- when the last batch was accepted
    last_error       TEXT NOT NULL DEFAULT '',
    last_error_at    TEXT NOT NULL DEFAULT ''
);

-- Refused second financings (409 already-financed): what the Attestations screen lists.
CREATE TABLE attestation_hits (
    hit_id            TEXT PRIMARY KEY,
    ts                TEXT NOT NULL,
    fingerprint       TEXT NOT NULL,
    document_type     TEXT NOT NULL,
    document_number   TEXT NOT NULL,
    issuer_tax_id     TEXT NOT NULL,
    financed_by       TEXT NOT NULL,              -- the member that financed it first
    financed_at       TEXT NOT NULL,
    requested_by      TEXT NOT NULL
);
CREATE INDEX attestation_hits_ts ON attestation_hits (ts);
