"""The gateway's one error root.

Every failure a handler can meet is a :class:`GatewayError`. Lower layers (PKCS#11, SQLite,
PostgreSQL, parsing) translate their own exceptions into one of these at their boundary
(``raise ... from exc``); the error middleware alone renders them as RFC 9457 problem documents.
A ``code`` is stable: clients match on the problem ``type``, which is built from it.
"""

from __future__ import annotations

from typing import Any, ClassVar

PROBLEM_BASE = "https://ecny-gateway.dev/problems/"


class GatewayError(Exception):
    """Root of every error the gateway reports.

    Attributes:
        code: stable machine-readable name; the problem ``type`` is ``PROBLEM_BASE + code``.
        http_status: HTTP status the API answers with.
        title: short human summary, the same for every instance of the class.
    """

    code: ClassVar[str] = "internal-error"
    http_status: ClassVar[int] = 500
    title: ClassVar[str] = "Internal error"
    audited_in_transaction: bool = False
    """Its audit entry committed with the refusal: no second one (a class's default, or set on an instance
    by whoever committed it)."""

    def __init__(self, detail: str = "", **extra: Any) -> None:
        super().__init__(detail or self.title)
        self.detail = detail or self.title
        self.extra = extra

    @property
    def type_uri(self) -> str:
        return PROBLEM_BASE + self.code

    def to_problem(self, instance: str | None = None) -> dict[str, Any]:
        """The RFC 9457 problem document for this error."""
        body: dict[str, Any] = {
            "type": self.type_uri,
            "title": self.title,
            "status": self.http_status,
            "detail": self.detail,
        }
        if instance:
            body["instance"] = instance
        body.update(self.extra)
        return body


# --- 400: the request itself is wrong -------------------------------------------------------------


class BadRequest(GatewayError):
    """The request is malformed: not JSON, wrong types, missing fields."""

    code = "bad-request"
    http_status = 400
    title = "Bad request"


class InvalidJson(BadRequest):
    """The body is not parseable as the declared content type."""

    code = "invalid-body"
    title = "Body is not valid JSON or CBOR"


class ValidationFailed(BadRequest):
    """The body parsed but a field has the wrong type, range or format."""

    code = "validation-failed"
    title = "Request validation failed"


class TextNotStorable(ValidationFailed):
    """A text value holds a character the store cannot keep: a NUL (U+0000), which PostgreSQL refuses. The
    API refuses it at the boundary (``gateway.api.codecs.refuse_nul``); this is the store's own refusal, for
    text that came another way (a device's log, a peer's feed), so that bad data is never reported as the
    store being down."""


class IdempotencyKeyRequired(BadRequest):
    """An operation that moves money or consumes a nonce was sent without an Idempotency-Key."""

    code = "idempotency-key-required"
    title = "Idempotency-Key header required"


class RawUsageNotExclusive(ValidationFailed):
    """A key asked for with usage ``raw`` next to another usage: a ``raw`` key signs any digest it
    is given, so beside ``ecny``, ``voucher``, ``audit`` or ``evm`` it would forge envelopes,
    vouchers, checkpoints or transactions past every policy. ``raw`` keys have no other usage."""

    code = "raw-usage-not-exclusive"
    title = "Usage raw cannot be combined with another usage"


class UnsupportedMediaType(GatewayError):
    """The Content-Type is not one the endpoint accepts."""

    code = "unsupported-media-type"
    http_status = 415
    title = "Unsupported media type"


class VerificationUnsupported(BadRequest):
    """The gateway cannot check this key's signatures (or encode its public key in the asked format)
    in software: SM2 has no implementation in `cryptography` and no registered JWK or COSE curve."""

    code = "verification-unsupported"
    title = "Not supported for this key's algorithm"


# --- 401/403: who you are and what you may do ----------------------------------------------------


class Unauthenticated(GatewayError):
    """No credentials, or credentials that do not identify anyone (unknown, revoked, expired)."""

    code = "unauthenticated"
    http_status = 401
    title = "Authentication required"


class Forbidden(GatewayError):
    """The caller is known but its role does not allow this operation."""

    code = "forbidden"
    http_status = 403
    title = "Not allowed for this role"


class KeyUsageNotAllowed(Forbidden):
    """The key exists but its usages do not include the requested operation."""

    code = "key-usage-not-allowed"
    title = "Key usage does not allow this operation"


class NotASession(Forbidden):
    """``DELETE /v1/sessions`` with an API key or a client certificate: only a session can be ended
    (an API client's key is revoked with ``ecny-gateway clients revoke``)."""

    code = "not-a-session"
    title = "The credential is not a session"


class SelfAdministration(Forbidden):
    """An administrator tried to disable or change the role of the user account they are logged in
    with: that is done by another administrator (or the CLI), so no one raises their own role."""

    code = "self-administration"
    title = "Not on your own account"


class RawKeyNotExclusive(KeyUsageNotAllowed):
    """Raw signing with a key whose record lists ``raw`` next to another usage. No such key can be
    created, so the key table was written around the gateway (or before this rule): the key is
    refused for raw signing, and flagged in the log at start-up."""

    code = "raw-key-not-exclusive"
    title = "Key has raw usage next to another usage"


# --- 404/409/413/429 ------------------------------------------------------------------------------


class NotFound(GatewayError):
    """The addressed resource does not exist (or is not visible to the caller)."""

    code = "not-found"
    http_status = 404
    title = "Not found"


class KeyNotFound(NotFound):
    """No key with that id — in the store, or no matching private key object in the token."""

    code = "key-not-found"
    title = "Key not found"


class Conflict(GatewayError):
    """The request conflicts with the current state."""

    code = "conflict"
    http_status = 409
    title = "Conflict"


class IdempotencyConflict(Conflict):
    """The Idempotency-Key was used before with a different request body, or is still in flight."""

    code = "idempotency-key-reused"
    title = "Idempotency-Key reused with a different request"


class IdempotencyRaced(IdempotencyConflict):
    """Another request with this Idempotency-Key committed first while this one ran (another
    process or instance): its transaction rolled back — or, for a raw signature, only its answer was
    not recorded (the audit entry of the signature made stays). Answered from the winner's record, so
    a client sees this only if that record cannot be read back."""


class AlreadyExists(Conflict):
    """A resource with this unique name exists already."""

    code = "already-exists"
    title = "Already exists"


class AmbiguousKey(Conflict):
    """More than one private key object in the token matches a key id: refuse rather than guess."""

    code = "ambiguous-key"
    title = "More than one key object matches"


class PayloadTooLarge(GatewayError):
    """The body or a list in it is larger than allowed."""

    code = "payload-too-large"
    http_status = 413
    title = "Payload too large"


class RateLimited(GatewayError):
    """The client sent more requests than its rate allows."""

    code = "rate-limited"
    http_status = 429
    title = "Too many requests"


class LoginThrottled(RateLimited):
    """Too many login attempts for one username: further attempts are refused, without their
    password being checked, until the lockout ends (``Retry-After``)."""

    code = "login-throttled"
    title = "Too many login attempts"

    def __init__(self, detail: str, retry_after: int) -> None:
        super().__init__(detail, retry_after=retry_after)
        self.retry_after = retry_after


class LoginRateLimited(RateLimited):
    """Too many logins from one source address (``auth.login_rate_per_second``): refused before
    any password is checked or anything is written."""

    code = "login-rate-limited"
    title = "Too many logins from this address"

    def __init__(self, detail: str, retry_after: int) -> None:
        super().__init__(detail, retry_after=retry_after)
        self.retry_after = retry_after


class UserNotFound(NotFound):
    """No user (of the teller UI) has that username."""

    code = "user-not-found"
    title = "User not found"


class KeyRetired(Conflict):
    """The key version was superseded by a rotation (or by a newer key of its usage): it still
    verifies and its COSE kid still resolves, but it no longer signs."""

    code = "key-retired"
    title = "Key version retired: verify only"


class KeyDisabled(Conflict):
    """An administrator disabled the key version: it signs nothing (its signatures still verify).
    For a usage whose active key is disabled: rotate it or generate a new key of that usage."""

    code = "key-disabled"
    title = "Key version disabled"


class KeyNotAdoptable(Conflict):
    """An existing HSM key cannot be adopted: it is extractable, not sensitive or not private, cannot
    sign, is of an algorithm or mechanism the profile does not give, or its token is another one."""

    code = "key-not-adoptable"
    title = "The HSM key cannot be adopted"


# --- 5xx: our dependencies -----------------------------------------------------------------------


class ServiceUnavailable(GatewayError):
    """A dependency is down; the client should retry after ``retry_after`` seconds."""

    code = "service-unavailable"
    http_status = 503
    title = "Service unavailable"

    def __init__(self, detail: str = "", retry_after: int = 1, **extra: Any) -> None:
        super().__init__(detail, **extra)
        self.retry_after = retry_after


class HsmUnavailable(ServiceUnavailable):
    """The HSM cannot be reached or lost its sessions; recovery is under way."""

    code = "hsm-unavailable"
    title = "HSM unavailable"


class StoreUnavailable(ServiceUnavailable):
    """The database cannot be reached or is locked for too long."""

    code = "store-unavailable"
    title = "Store unavailable"


class ServerRefused(GatewayError):
    """A check that runs inside the database (a PostgreSQL function) refused, and so aborted the transaction.

    Raised by the store with the SQLSTATE the function chose (``EC...``) as ``state`` and its DETAIL as
    ``detail``; the code that sent the statement knows what they mean and raises the refusal the user sees
    (a policy refusal, an unknown wallet, a disabled key). Never an answer of its own.
    """

    code = "internal-error"
    title = "Refused by a check in the database"

    def __init__(self, state: str, detail: str) -> None:
        super().__init__(detail)
        self.state = state


class HsmError(GatewayError):
    """The HSM refused an operation for a reason that retrying will not fix (bad mechanism, bad PIN)."""

    code = "hsm-error"
    http_status = 500
    title = "HSM refused the operation"


class HsmLoginFailed(HsmError):
    """The token rejected the PIN. Never retried: a retry could lock the token."""

    code = "hsm-login-failed"
    title = "HSM login failed"


class ConfigError(GatewayError):
    """The configuration or an HSM profile is incomplete or contradictory; names file and key."""

    code = "config-error"
    title = "Configuration error"


class AuditChainBroken(GatewayError):
    """The audit chain or one of its checkpoints does not verify."""

    code = "audit-chain-broken"
    title = "Audit chain broken"


class LoginBusy(ServiceUnavailable):
    """Every password check slot (``auth.password_checks_max``) and waiting place is taken: the
    login is refused at once, before anything is written, and may be retried after ``Retry-After``."""

    code = "login-busy"
    title = "Too many logins at once"


# --- wallets, ledger and approvals ---------------------------------------------------------------


class InvalidWalletId(BadRequest):
    """A wallet id that is not 16 digits with a valid Luhn check digit."""

    code = "invalid-wallet-id"
    title = "Invalid wallet id"


class SameWallet(BadRequest):
    """A transfer whose payer and payee are the same wallet."""

    code = "same-wallet"
    title = "Payer and payee are the same wallet"


class InvalidAmount(BadRequest):
    """An amount that is not a positive integer number of fen within the configured maximum."""

    code = "invalid-amount"
    title = "Invalid amount"


class WalletNotFound(NotFound):
    code = "wallet-not-found"
    title = "Wallet not found"


class PolicyRefused(GatewayError):
    """Refused by policy; ``reasons`` lists every rule that failed (machine-readable)."""

    code = "policy-refused"
    http_status = 422
    title = "Refused by policy"

    def __init__(self, detail: str = "", reasons: tuple[str, ...] | list[str] = (), **extra: Any) -> None:
        super().__init__(detail, reasons=list(reasons), **extra)
        self.reasons = list(reasons)


class WalletNotActive(PolicyRefused):
    """The payer or payee wallet is frozen or closed."""

    code = "wallet-not-active"
    title = "Wallet is frozen or closed"


class InsufficientFunds(PolicyRefused):
    code = "insufficient-funds"
    title = "Insufficient funds"


class LimitExceeded(PolicyRefused):
    """A tier limit (single, daily, annual payment or balance cap) would be exceeded."""

    code = "limit-exceeded"
    title = "Tier limit exceeded"


class SelfApproval(Forbidden):
    """Maker-checker: the requester of an operation cannot approve or reject it."""

    code = "self-approval"
    title = "The requester cannot decide their own request"


class ApprovalPayloadMismatch(Conflict):
    """The approval names a payload hash other than the one pending (or the stored payload changed)."""

    code = "approval-payload-mismatch"
    title = "Approval does not match the pending payload"


class ApprovalNotPending(Conflict):
    code = "approval-not-pending"
    title = "Approval is not pending"


class ApprovalExpired(Conflict):
    code = "approval-expired"
    title = "Approval expired"


class ApproverNotAPerson(Forbidden):
    """Dual control: approvals are decided by people (a user's session), never by an API client,
    whatever its role."""

    code = "approver-not-a-person"
    title = "Only a person may decide an approval"


class ApprovalAlreadyPending(Conflict):
    """An approval for the same subject (e.g. the honour of one discrepancy) is pending already."""

    code = "approval-already-pending"
    title = "An approval is pending for this already"


class HonourAboveCap(PolicyRefused):
    """A held offline payment above its payer certificate's per-payment cap cannot be honoured: no
    honest device signs it, and the bank does not pay it from suspense."""

    code = "honour-above-cap"
    title = "Honour above the certificate's per-payment cap"


class InterestedParty(Forbidden):
    """Maker-checker: the decider's owner is named on the approval as an interested party (e.g. the
    person who registered the device an honour or a load concerns, and so may hold its key)."""

    code = "interested-party"
    title = "An interested party cannot decide this approval"


# --- EVM (stablecoin) signing --------------------------------------------------------------------


class InvalidAddress(BadRequest):
    """Not a 20-byte hex address, or a mixed-case address whose EIP-55 checksum is wrong."""

    code = "invalid-address"
    title = "Invalid EVM address"


class InvalidEvmAmount(BadRequest):
    """A wei or token amount that is not a decimal string of a non-negative integer below 2**256
    (negative, fractional, exponent, hex or a JSON number)."""

    code = "invalid-evm-amount"
    title = "Invalid EVM amount"


class InvalidGasFields(BadRequest):
    """Gas fields missing or inconsistent with the transaction type (``gas_price`` on an EIP-1559
    transaction, a priority fee above the fee cap, a gas limit below 21,000…)."""

    code = "invalid-gas-fields"
    title = "Missing or inconsistent gas fields"


class InvalidEvmTransaction(BadRequest):
    """The transaction body is contradictory: both or neither of raw ``to``/``value``/``data`` and
    ``erc20``, a method without its recipient, undecodable calldata…"""

    code = "invalid-evm-transaction"
    title = "Invalid EVM transaction"


class InvalidTypedData(BadRequest):
    """An EIP-712 document that does not follow the standard (unknown type, missing or extra field,
    value out of range for its type)."""

    code = "invalid-typed-data"
    title = "Invalid EIP-712 typed data"


class UnknownChain(PolicyRefused):
    """The chain id is not in the configured chain registry (``[[evm.chains]]``)."""

    code = "unknown-chain"
    title = "Chain not in the registry"


class UnknownToken(PolicyRefused):
    """The ERC-20 token is not registered for this chain."""

    code = "unknown-token"
    title = "Token not in the registry"


class UnknownContract(PolicyRefused):
    """Calldata addressed to a contract that is not in the registry, or to a registered token with a
    method the gateway cannot decode: the gateway never signs what it cannot read."""

    code = "unknown-contract"
    title = "Calldata to an unknown contract or method"


class EvmCapExceeded(PolicyRefused):
    """A per-transaction or daily cap of the token (or of the chain's native coin) would be exceeded."""

    code = "evm-cap-exceeded"
    title = "EVM amount cap exceeded"


class RecipientNotAllowed(PolicyRefused):
    """The recipient (or spender) is on the chain's deny list, or not on its allow list."""

    code = "recipient-not-allowed"
    title = "Recipient not allowed"


class TypedDataDomainNotAllowed(PolicyRefused):
    """The EIP-712 domain (chain id, verifying contract, name, version) is not on the allow list."""

    code = "typed-data-domain-not-allowed"
    title = "EIP-712 domain not allowed"


class NonceConflict(Conflict):
    """An explicit nonce that is not the next one for the address (already used, or leaving a gap)."""

    code = "nonce-conflict"
    title = "Nonce already used or out of sequence"


class SignatureRecoveryFailed(HsmError):
    """The HSM's signature does not recover to the key's public key: nothing is returned."""

    code = "signature-recovery-failed"
    title = "Signature does not match the key"


class TypedDataTooComplex(InvalidTypedData):
    """An EIP-712 document whose type graph or message is larger or deeper than the gateway walks
    (too many struct definitions or fields, structs or arrays nested too deep)."""

    code = "typed-data-too-complex"
    title = "EIP-712 typed data too large or too deep"


class TypedDataNotAllowed(PolicyRefused):
    """An EIP-712 ``primaryType`` the gateway may not sign on this domain: neither a standard
    authorisation it decodes (EIP-2612 ``Permit``, EIP-3009 ``TransferWithAuthorization`` /
    ``ReceiveWithAuthorization`` on a registered token, with the exact standard struct) nor a type the
    chain's config lists for the domain."""

    code = "typed-data-not-allowed"
    title = "EIP-712 type not allowed"


class EvmFeeCapExceeded(PolicyRefused):
    """The transaction's gas limit, fee per gas or total fee (gas limit × fee per gas) is above the
    chain's fee caps (``[evm.chains.fees]``)."""

    code = "evm-fee-cap-exceeded"
    title = "EVM fee cap exceeded"


class InvalidRpcRequest(BadRequest):
    """``POST /v1/evm/rpc``: not a JSON-RPC 2.0 request object (no ``"jsonrpc": "2.0"``, a method that is
    not a string, params neither an array nor an object, an empty or too large batch). JSON-RPC code -32600."""

    code = "invalid-rpc-request"
    title = "Invalid JSON-RPC request"


class RpcMethodNotFound(NotFound):
    """``POST /v1/evm/rpc``: a method the signer does not offer (a node's read methods are not proxied),
    or ``eth_sendTransaction`` with no upstream node configured. JSON-RPC code -32601."""

    code = "rpc-method-not-found"
    title = "JSON-RPC method not found"


class InvalidRpcParams(ValidationFailed):
    """``POST /v1/evm/rpc``: the params of a known method are missing, of the wrong shape, or a hex
    quantity is not canonical 0x-hex. JSON-RPC code -32602."""

    code = "invalid-rpc-params"
    title = "Invalid JSON-RPC params"


class NoDefaultChain(BadRequest):
    """A JSON-RPC call needs the default chain (``eth_chainId``, a transaction without ``chainId``) and
    ``evm_rpc.default_chain_id`` is not set."""

    code = "evm-rpc-no-default-chain"
    title = "No default chain configured"


class EvmAccountNotFound(KeyNotFound):
    """A JSON-RPC ``from`` (or signer) address that is no key of the usage the method needs (``evm`` to
    sign transactions and typed data, ``message`` for ``personal_sign``/``eth_sign``)."""

    code = "evm-account-not-found"
    title = "No key for this address"


class EvmApprovalPending(GatewayError):
    """JSON-RPC only: the transaction or typed data was recorded and waits for a supervisor (the HTTP
    endpoints answer 202 instead). Its ``approval_id`` is in the error's data; once approved, the signed
    result is read from ``GET /v1/approvals/{id}`` — a JSON-RPC retry with the same Idempotency-Key (or the
    same body) answers this error again. JSON-RPC code -32010."""

    code = "evm-approval-pending"
    http_status = 202
    title = "Waiting for a supervisor's approval"


class EvmNonceBehindChain(Conflict):
    """``eth_sendTransaction``: the upstream node counts more transactions of the address than the
    gateway's next nonce (the address was used elsewhere, or nonces were reset). Nothing is signed; an
    admin sets the next nonce (``POST /v1/evm/nonces/{chain_id}/{address}``)."""

    code = "evm-nonce-behind-chain"
    title = "Local nonce behind the chain"


class EvmUpstreamFailed(GatewayError):
    """The configured Ethereum node did not answer, answered something that is not JSON-RPC, serves
    another chain, or refused the signed transaction (its error is in ``upstream_error``)."""

    code = "evm-upstream-failed"
    http_status = 502
    title = "Upstream Ethereum node failed"


# --- hard wallets: the serial link, offline formats and reconciliation ---------------------------


class DeviceProtocolError(GatewayError):
    """The serial link to a hard wallet failed. Raised by ``gateway.hardwallet`` (the teller's side of the
    link and the simulator), never by an HTTP handler."""

    code = "device-protocol-error"
    http_status = 502
    title = "Hard wallet link error"


class FrameError(DeviceProtocolError):
    """A frame that does not decode: bad COBS, CRC mismatch, not CBOR, too large, or not a protocol message."""

    code = "device-frame-invalid"
    title = "Invalid frame on the serial link"


class DeviceTimeout(DeviceProtocolError):
    """The device did not answer a request within its timeout."""

    code = "device-timeout"
    http_status = 504
    title = "Hard wallet did not answer"


class DeviceRefused(DeviceProtocolError):
    """The device answered ``ok: false``; ``device_code`` is its reason (e.g. ``insufficient-balance``)."""

    code = "device-refused"
    title = "Hard wallet refused the operation"


class DevicePortError(DeviceProtocolError):
    """The serial port cannot be opened, read or written."""

    code = "device-port-error"
    title = "Serial port error"


class OfflineFormatError(ValidationFailed):
    """A certificate, voucher, payment, log export or statement that does not parse as its format."""

    code = "invalid-offline-record"
    title = "Malformed offline record"


class DeviceNotFound(NotFound):
    code = "device-not-found"
    title = "Device not found"


class IssuerNotEndorsed(Conflict):
    """A device's new certificate would come from a voucher key that no endorsement chain reaches from the
    key the device pins (that key was disabled, or the new one adopted): the device would refuse it.
    Provision the device again (a new registration)."""

    code = "issuer-not-endorsed"
    title = "No endorsement leads from the device's issuer to the voucher key"


class DeviceNotActive(PolicyRefused):
    """The device is frozen, revoked or unloaded, or its certificate has expired."""

    code = "device-not-active"
    title = "Device is not active"


class InvalidDeviceSignature(PolicyRefused):
    """A device-signed message (log export, unload statement) whose signature does not verify with the
    device's registered key, or that names another device."""

    code = "device-signature-invalid"
    title = "Device signature invalid"


class DeviceSyncRequired(Conflict):
    """The unload statement names payments or receipts the gateway has not reconciled yet: sync first."""

    code = "device-sync-required"
    title = "Sync the device before unloading"


class DiscrepancyNotFound(NotFound):
    code = "discrepancy-not-found"
    title = "Discrepancy not found"


class DiscrepancyNotOpen(Conflict):
    code = "discrepancy-not-open"
    title = "Discrepancy is already resolved"


class ResolutionRefused(PolicyRefused):
    """The chosen resolution cannot be carried out (e.g. ``post`` with no held payment or no reserve)."""

    code = "resolution-refused"
    title = "Resolution refused"


# --- risk monitoring: delivery of risk events, reports ---------------------------------------------


class RiskDeliveryNotFound(NotFound):
    """No webhook delivery of that event to that endpoint is recorded."""

    code = "risk-delivery-not-found"
    title = "Risk event delivery not found"


class RiskDeliveryNotDead(Conflict):
    """Only a dead delivery (every attempt failed) can be replayed; a pending one is still being tried
    and a delivered one has reached its receiver."""

    code = "risk-delivery-not-dead"
    title = "Delivery is not dead"


class InvalidReportDate(ValidationFailed):
    """A report or chart date that is not a UTC calendar day ``YYYY-MM-DD``, or is in the future."""

    code = "invalid-report-date"
    title = "Invalid report date"


# --- risk monitoring and early warning: events and triage ------------------------------------------


class RiskEventNotFound(NotFound):
    """No risk event with this id — or one the caller may not read (a backend client reads only the events
    that name it)."""

    code = "risk-event-not-found"
    title = "Risk event not found"


class RiskTriageOwnEvent(Forbidden):
    """The event names the caller (under any of their identities) as one whose decisions are its
    evidence, or the assignee is such a person: someone else triages it."""

    code = "risk-triage-own-event"
    title = "You cannot triage an event about yourself"


class RiskEventClosed(Conflict):
    """The event is closed: closed events stay closed (a new finding is a new event)."""

    code = "risk-event-closed"
    title = "Risk event is closed"
# --- trade-finance attestations and the alliance -------------------------------------------------


class InvalidTradeDocument(ValidationFailed):
    """A trade document's fields break its type's rules (number format, date, currency, amount)."""

    code = "invalid-trade-document"
    title = "The document's fields do not fit its type"


class AttestationNotFound(NotFound):
    """No attestation with this id."""

    code = "attestation-not-found"


class AlreadyFinanced(Conflict):
    """A ``finance`` attestation of a document (same fingerprint) that this bank or an alliance member
    financed already; ``member`` and ``financed_at`` name the first. The refusal, its audit entry and its
    risk signal were committed together (``audited_in_transaction``)."""

    code = "already-financed"
    title = "This document has been financed already"
    audited_in_transaction = True


class AllianceNotConfigured(ServiceUnavailable):
    """Attestations need ``[alliance] member_id`` and the alliance HMAC key in the HSM (key ceremony)."""

    code = "alliance-not-configured"
    title = "The alliance is not configured"


class AllianceBatchRefused(GatewayError):
    """A peer's fingerprint batch failed verification (signature, member, nonce, cursor, age, order) and
    nothing of it was stored. Raised by the sync (CLI, scheduler), never by an endpoint."""

    code = "alliance-batch-refused"
    http_status = 502
    title = "A peer's fingerprint batch was refused"


class AlliancePeerUnavailable(GatewayError):
    """A peer did not answer the sync with a batch (unreachable, timeout, an HTTP error)."""

    code = "alliance-peer-unavailable"
    http_status = 502
    title = "An alliance peer is unavailable"
