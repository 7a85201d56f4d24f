"""Settings: a TOML file, then ``ECNY_<SECTION>__<KEY>`` environment variables over it.

Every field has a docstring: that text is the reference for operators. PINs are secrets: they come
from ``ECNY_HSM__PIN`` or ``hsm.pin_file``, never from the command line, and never show in reprs.
Errors name the file (or variable) and the key.
"""

from __future__ import annotations

import ipaddress
import json
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from gateway.errors import ConfigError
from gateway.policy.chains import EvmSettings
from gateway.policy.limits import DEFAULT_TIERS, TierLimits
from gateway.risk.events import Severity

ENV_PREFIX = "ECNY_"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True)


class ServerSettings(_Section):
    host: str = "127.0.0.1"
    """Address to listen on."""
    port: Annotated[int, Field(ge=0, le=65535)] = 8700
    """TCP port (0 picks a free one)."""
    max_body_bytes: Annotated[int, Field(ge=1024)] = 1_048_576
    """Largest request body accepted; larger bodies get 413."""
    tls_cert: Path | None = None
    """PEM certificate chain; with ``tls_key`` the gateway serves HTTPS."""
    tls_key: Path | None = None
    """PEM private key of ``tls_cert`` (a TLS key on disk, not a signing key)."""
    tls_client_ca: Path | None = None
    """PEM CA bundle; when set, clients must present a certificate it issued (mTLS)."""
    mtls_identities: dict[str, str] = {}
    """Client certificate subject CN → API client name; such a client needs no bearer key."""
    rate_limit_per_second: Annotated[float, Field(ge=0)] = 2000
    """Requests per second per principal (token bucket, burst = 2 s worth), shared out between the
    HTTP processes; 0 = unlimited. The default is above the 1,000 transfers/s one backend client may
    need, and stops one runaway client from taking every signature the HSM can make."""
    access_log: bool = False
    """Log one line per request (costs throughput; errors are always logged)."""
    processes: Annotated[int, Field(ge=1, le=64)] = 1
    """HTTP worker processes sharing the listening socket (one event loop and GIL each). The signer
    workers (``hsm.workers``) are shared out between them, at least one each."""

    @model_validator(mode="after")
    def _identities_need_client_ca(self) -> ServerSettings:
        # Without a CA no client certificate is asked for, so the identities would never apply:
        # an operator who wrote them believes in a control that is not there.
        if self.mtls_identities and self.tls_client_ca is None:
            raise ValueError(
                "server.mtls_identities is set but server.tls_client_ca is not: without a client CA no "
                "client certificate is requested and the identities would be ignored; set "
                "server.tls_client_ca (and tls_cert, tls_key) or remove server.mtls_identities"
            )
        return self


class HsmSettings(_Section):
    profile: str = "softhsm"
    """A shipped profile's name (``gateway/hsm/profiles``: ``softhsm`` → ``softhsm.toml``) or a profile file."""
    module: str | None = None
    """Overrides the profile's PKCS#11 module path."""
    token_label: str | None = None
    """Overrides the profile's token label."""
    pin: SecretStr | None = None
    """User PIN. Set it through ``ECNY_HSM__PIN``, never in a file under version control."""
    pin_file: Path | None = None
    """File holding the user PIN (mode 0600); used when ``pin`` is not set."""
    workers: Annotated[int, Field(ge=1, le=64)] | None = None
    """Signer worker processes; defaults to the profile's ``sessions.workers``."""
    max_batch: Annotated[int, Field(ge=1, le=4096)] = 256
    """Most signatures one worker message carries."""

    def read_pin(self) -> str:
        if self.pin is not None:
            return self.pin.get_secret_value()
        if self.pin_file is not None:
            return read_private_file(self.pin_file, "hsm.pin_file")
        raise ConfigError("hsm: no PIN; set ECNY_HSM__PIN or hsm.pin_file")


def read_private_file(path: Path, setting: str) -> str:
    """The stripped text of a secret file, refused (as ssh refuses a private key) when its group or
    others have any access to it: a PIN readable by other users lets any of them sign.

    A symlink is followed (secret mounts are often symlinks): the mode checked is the file's own.

    Raises:
        ConfigError: unreadable, or open to group or others; the message names ``setting`` and the fix.
    """
    try:
        with path.open("rb") as handle:
            mode = os.fstat(handle.fileno()).st_mode & 0o777
            if mode & 0o077:
                raise ConfigError(
                    f"{setting}: {path} has mode {mode:04o}, open to group or others; "
                    f"make it readable by the gateway's user only (chmod 600 {path})"
                )
            return handle.read().decode("utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"{setting}: cannot read {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{setting}: {path} is not UTF-8 text") from exc


class StoreSettings(_Section):
    dsn: str = "sqlite:///var/gateway.db"
    """``sqlite:///relative/path``, ``sqlite:////absolute/path`` or ``postgresql://user@host/db``."""
    pool_size: Annotated[int, Field(ge=1, le=256)] = 8
    """PostgreSQL: connections per HTTP process, each with the thread that runs its transactions
    (so the server needs ``instances × [server] processes × pool_size`` connections, plus the
    CLI's). SQLite ignores it: one writer and one reader connection."""
    house_fold_seconds: Annotated[float, Field(gt=0, le=3600)] = 1.0
    """PostgreSQL: how often the amounts posted to the bank's own accounts (``bank:issuance``,
    ``bank:suspense``) are folded into their balance rows. They are posted as pending rows so that cash
    movements never wait for one another; a balance read sums what is still pending, so this only bounds
    how many there are to sum. SQLite ignores it (it updates the rows at once)."""


class AuditSettings(_Section):
    checkpoint_every: Annotated[int, Field(ge=1)] = 1000
    """Sign the chain head with the audit key every this many entries (and at shutdown)."""
    checkpoint_seconds: Annotated[float, Field(ge=0)] = 10.0
    """Also sign it when it has moved and this many seconds have passed (0: by count only). This bounds
    what could be cut off the chain's unsigned tail unnoticed to the last few seconds, whatever the load."""
    key_id: str | None = None
    """Key that signs checkpoints; by default the one key whose usages include ``audit``."""
    flush_max: Annotated[int, Field(ge=1)] = 1024
    """Most entries written in one grouped commit."""
    refusal_window_seconds: Annotated[float, Field(gt=0, le=3600)] = 60.0
    """Anonymous refusals (401 without or with unknown credentials, refused logins) are counted and
    written as one entry per cause every this many seconds (and at shutdown), not one per request."""
    witness_file: Path | None = None
    """Append-only JSON-lines copy of every signed checkpoint, outside the store (created 0600), for
    ``ecny-gateway audit verify --witness`` to catch a cut tail. Default: ``audit-witness.jsonl``
    next to the SQLite database, or ``var/audit-witness.jsonl`` with PostgreSQL. Several processes
    and instances may share it; for an outsider's guarantee keep a copy off this host too
    (``GET /v1/audit/checkpoints``)."""


class AuthSettings(_Section):
    session_ttl_seconds: Annotated[int, Field(ge=60)] = 8 * 3600
    """Lifetime of a teller session token."""
    credential_cache_seconds: Annotated[float, Field(ge=0)] = 2.0
    """How long a verified API key stays cached in memory (revocation takes effect within it). Session
    tokens are never cached: logout, disabling a user and role changes apply at the next request."""
    login_max_attempts: Annotated[int, Field(ge=1)] = 5
    """Login attempts for one username (since its last success) before it is locked for a while."""
    login_lockout_seconds: Annotated[int, Field(ge=1)] = 30
    """The first lockout; each attempt after a lockout ends doubles it, up to ``login_lockout_max_seconds``."""
    login_lockout_max_seconds: Annotated[int, Field(ge=1)] = 900
    """The longest lockout."""
    login_window_seconds: Annotated[int, Field(ge=60)] = 3600
    """A username's attempts are forgotten once none has come for this long."""
    password_checks_max: Annotated[int, Field(ge=1, le=1024)] | None = None
    """Password (argon2id, 64 MiB each) checks that may run at once in the whole server; by default
    2 × CPU cores, shared out between the HTTP processes (at least one each)."""
    password_checks_waiting_max: Annotated[int, Field(ge=0, le=65536)] = 32
    """Logins that may wait for a password check slot (per HTTP process); beyond them a login gets
    503 ``login-busy`` with Retry-After at once, before anything is written."""
    login_rate_per_second: Annotated[float, Field(ge=0)] = 20.0
    """Logins per second per source address (token bucket, burst = 2 s worth, per HTTP process),
    checked before anything else; 0 = unlimited. Behind a proxy every login has the proxy's address,
    so this becomes one bucket for all (``X-Forwarded-For`` is not trusted)."""


class TierSettings(_Section):
    balance_cap_fen: Annotated[int, Field(ge=0)] | None
    """Largest balance the wallet may hold; none = no cap."""
    single_fen: Annotated[int, Field(ge=0)] | None
    """Largest single payment."""
    daily_fen: Annotated[int, Field(ge=0)] | None
    """Payments per business day (China Standard Time)."""
    annual_fen: Annotated[int, Field(ge=0)] | None
    """Payments per calendar year (China Standard Time)."""


def _default_tiers() -> dict[str, TierSettings]:
    return {
        str(tier): TierSettings(
            balance_cap_fen=limits.balance_cap, single_fen=limits.single, daily_fen=limits.daily,
            annual_fen=limits.annual,
        )
        for tier, limits in DEFAULT_TIERS.items()
    }


class WalletSettings(_Section):
    tiers: dict[str, TierSettings] = Field(default_factory=_default_tiers)
    """Limits per tier "1".."4" (docs/spec.md §7 defaults); ``null``/absent values mean no limit."""
    id_prefix: Annotated[str, Field(pattern=r"^[0-9]{1,6}$")] = "8"
    """Leading digits of new wallet ids (the institution's range)."""
    max_amount_fen: Annotated[int, Field(ge=1)] = 10**15
    """Largest amount any request may name; larger ones are 400, whatever the tier."""

    def limits(self, tier: int) -> TierLimits:
        section = self.tiers.get(str(tier))
        if section is None:
            raise ConfigError(f"wallets.tiers.{tier} is not configured")
        return TierLimits(section.balance_cap_fen, section.single_fen, section.daily_fen, section.annual_fen)


class ApprovalSettings(_Section):
    transfer_threshold_fen: Annotated[int, Field(ge=1)] = 5_000_000
    """Transfers above this amount (¥50,000 by default) wait for a supervisor's approval."""
    ttl_seconds: Annotated[int, Field(ge=60)] = 24 * 3600
    """Pending approvals expire after this long."""
    cash_in_threshold_fen: Annotated[int, Field(ge=1)] = 5_000_000
    """Cash-ins above this amount (¥50,000 by default) wait for a second person's approval."""
    cash_out_threshold_fen: Annotated[int, Field(ge=1)] = 5_000_000
    """Cash-outs above this amount (¥50,000 by default) wait for a second person's approval."""
    device_load_threshold_fen: Annotated[int, Field(ge=1)] = 5_000_000
    """Hard-wallet loads above this amount (¥50,000 by default) wait for a second person's approval."""
    cash_in_daily_threshold_fen: Annotated[int, Field(ge=1)] = 10_000_000
    """A cash-in that takes the day's cash-ins to one wallet (China Standard Time business day, this one
    included) above this sum (¥100,000 by default, twice the single threshold) waits for a second
    person's approval even when it is below ``cash_in_threshold_fen``: splitting does not avoid review."""
    cash_out_daily_threshold_fen: Annotated[int, Field(ge=1)] = 10_000_000
    """As ``cash_in_daily_threshold_fen``, for the day's cash-outs from one wallet (¥100,000 by default)."""
    device_load_daily_threshold_fen: Annotated[int, Field(ge=1)] = 10_000_000
    """As ``cash_in_daily_threshold_fen``, for the day's hard-wallet loads from one wallet (¥100,000 by
    default)."""


class EcnySettings(_Section):
    key_id: str | None = None
    """Key that signs transfer envelopes; by default the one key whose usages include ``ecny``."""


class TierCaps(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    per_payment_fen: Annotated[int, Field(ge=1)]
    """Largest single offline payment."""
    balance_fen: Annotated[int, Field(ge=1)]
    """Largest offline balance a device may hold (loads beyond it are refused)."""
    payments_per_sync: Annotated[int, Field(ge=1)]
    """Most payments a device may make between two syncs."""


def _default_caps() -> dict[str, TierCaps]:
    # Tier 4 (phone only) hard wallets: ¥500 a payment, ¥1,000 on the device — the usual anonymous-wallet caps.
    return {
        "1": TierCaps(per_payment_fen=1_000_000, balance_fen=5_000_000, payments_per_sync=1_000),
        "2": TierCaps(per_payment_fen=500_000, balance_fen=2_000_000, payments_per_sync=500),
        "3": TierCaps(per_payment_fen=200_000, balance_fen=500_000, payments_per_sync=200),
        "4": TierCaps(per_payment_fen=50_000, balance_fen=100_000, payments_per_sync=100),
    }


class OfflineSettings(_Section):
    """Offline payments (``[offline]``): read by gateway.offline."""

    caps: dict[str, TierCaps] = Field(default_factory=_default_caps)
    """Offline caps per wallet tier "1".."4", copied into each device certificate at registration."""
    certificate_days: Annotated[int, Field(ge=1, le=3650)] = 730
    """Validity of a device certificate; payments dated after it are flagged ``certificate-expired``."""
    voucher_minutes: Annotated[int, Field(ge=1, le=7 * 24 * 60)] = 24 * 60
    """A load voucher must be loaded onto the device within this long."""
    clock_skew_seconds: Annotated[int, Field(ge=0, le=86_400)] = 300
    """Device clocks drift: a payee's log must hold a payment dated at least this long before its export,
    or the payer's record is flagged ``unmatched-payer-record``."""
    signature_checks: Literal["each", "endorsed"] = "each"
    """``each``: verify every payment's own signature once. ``endorsed``: a payment in its payer's own
    device-signed log export is authenticated by the export's signature (one check per export); payments
    met only in a payee's log are still verified one by one. See docs/device-protocol.md."""
    key_id: str | None = None
    """Key that signs certificates, vouchers and acknowledgements; by default the one key with usage ``voucher``."""

    def tier_caps(self, tier: int) -> TierCaps:
        caps = self.caps.get(str(tier))
        if caps is None:
            raise ConfigError(f"offline.caps.{tier} is not configured")
        return caps


class LoggingSettings(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    """Lowest level written (JSON lines on stderr)."""


class RiskDeliverySettings(_Section):
    """How risk events leave the gateway (``[risk_delivery]``): read by gateway.monitor.webhooks and
    gateway.monitor.report."""

    source: Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[!-~]+$")] = "urn:ecny-gateway"
    """The CloudEvents ``source`` attribute of every webhook (a URI-reference naming this gateway or
    institution, e.g. ``https://gateway.bank.example/``); also written into the daily report."""
    poll_seconds: Annotated[float, Field(gt=0, le=60)] = 1.0
    """How often each HTTP process looks for new risk events and for deliveries that are due."""
    batch: Annotated[int, Field(ge=1, le=1000)] = 50
    """Most deliveries one process claims per endpoint and round (sent concurrently)."""
    claim_seconds: Annotated[float, Field(gt=0, le=3600)] = 60.0
    """A claimed delivery is reserved to the process that claimed it for this long; if that process dies
    before it records the outcome, another sends it again afterwards (at least once, same event id). Must
    exceed every webhook's ``timeout_seconds``."""
    report_key_id: str | None = None
    """Key that signs the daily risk report (``GET /v1/risk/reports/{date}``); by default the one key
    whose usages include ``report``."""


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class RiskWebhookSettings(_Section):
    """One receiver of risk events (``[[risk_webhooks]]``): CloudEvents 1.0 JSON, HMAC-SHA256 signed
    (docs/risk-delivery.md). The secret is never in this file: ``secret_file`` or ``secret_env``."""

    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")]
    """The endpoint's name: the ``endpoint`` of its deliveries (``/v1/risk/deliveries``); keep it when
    the URL changes, or pending deliveries wait for a name that is gone."""
    url: Annotated[str, Field(max_length=2000)]
    """Where events are POSTed: ``https://…``, or ``http://`` to a loopback address only (a sidecar)."""
    secret_file: Path | None = None
    """File holding the HMAC key (mode 0600, at least 32 characters)."""
    secret_env: Annotated[str, Field(pattern=r"^[A-Z_][A-Z0-9_]{0,127}$")] | None = None
    """Name of the environment variable holding the HMAC key (at least 32 characters); used when
    ``secret_file`` is not set."""
    timeout_seconds: Annotated[float, Field(gt=0, le=120)] = 10.0
    """An attempt that has no answer within this long failed."""
    max_attempts: Annotated[int, Field(ge=1, le=100)] = 10
    """Attempts before a delivery is dead (an admin can replay it: ``POST /v1/risk/deliveries/…/replay``)."""
    backoff_seconds: Annotated[float, Field(gt=0, le=3600)] = 5.0
    """Wait after the first failed attempt; each further failure doubles it (up to ``backoff_max_seconds``)."""
    backoff_max_seconds: Annotated[float, Field(gt=0, le=86_400)] = 3600.0
    """Longest wait between two attempts."""

    @model_validator(mode="after")
    def _check(self) -> RiskWebhookSettings:
        parts = urlsplit(self.url)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise ValueError(f"risk_webhooks {self.name}: url must be an http(s) URL")
        if parts.scheme == "http" and not _loopback(parts.hostname):
            raise ValueError(f"risk_webhooks {self.name}: plain http only to a loopback address; use https")
        if parts.username or parts.password:
            raise ValueError(f"risk_webhooks {self.name}: no credentials in the url (they would be logged)")
        if (self.secret_file is None) == (self.secret_env is None):
            raise ValueError(f"risk_webhooks {self.name}: set exactly one of secret_file and secret_env")
        return self

    def read_secret(self, environ: Mapping[str, str] | None = None) -> bytes:
        """The HMAC key. Raises ConfigError (naming the setting, never the value) when it is missing,
        readable by others or shorter than 32 characters."""
        setting = f"risk_webhooks.{self.name}"
        if self.secret_file is not None:
            secret = read_private_file(self.secret_file, f"{setting}.secret_file")
        else:
            assert self.secret_env is not None
            secret = (os.environ if environ is None else environ).get(self.secret_env, "").strip()
            if not secret:
                raise ConfigError(f"{setting}.secret_env: environment variable {self.secret_env} is not set")
        if len(secret) < 32:
            raise ConfigError(f"{setting}: the secret is shorter than 32 characters; use a random one "
                              "(e.g. `openssl rand -hex 32`)")
        return secret.encode()


def _unique_names(webhooks: list[RiskWebhookSettings]) -> list[RiskWebhookSettings]:
    names = [webhook.name for webhook in webhooks]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"risk_webhooks: names must be unique; repeated: {', '.join(duplicates)}")
    return webhooks


class _RiskRule(_Section):
    enabled: bool = True
    """Evaluate this rule (its signals are written either way)."""


class StructuringRule(_RiskRule):
    severity: Severity = "high"
    """Severity of its events."""
    min_count: Annotated[int, Field(ge=2)] = 3
    """Transfers or cash-outs just under their approval threshold (``[approvals] transfer_threshold_fen``,
    ``cash_out_threshold_fen``) from one wallet, or made by one teller across several wallets, that raise
    an event."""
    window_seconds: Annotated[int, Field(ge=60)] = 24 * 3600
    """Within this long."""
    band_percent: Annotated[int, Field(ge=1, le=50)] = 10
    """"Just under": at most the threshold and more than this percentage below it (10: ¥45,000–¥50,000
    for the ¥50,000 default)."""


class VelocityRule(_RiskRule):
    severity: Severity = "medium"
    """Severity of its events."""
    window_seconds: Annotated[int, Field(ge=10)] = 600
    """The window of the wallet, device and EVM address counts."""
    wallet_max: Annotated[int, Field(ge=2)] = 60
    """Transfers and cash-outs from one wallet within the window that raise an event."""
    client_window_seconds: Annotated[int, Field(ge=1)] = 60
    """The window of the per-client count (short: counting costs up to ``client_max`` index entries)."""
    client_max: Annotated[int, Field(ge=2)] = 20_000
    """Transfers and EVM transactions made by one API client or user within ``client_window_seconds`` that
    raise an event (set it near the busiest client's normal volume: a runaway or stolen key shows as a
    burst above it)."""
    device_max: Annotated[int, Field(ge=2)] = 6
    """Loads of one hard wallet within the window."""
    evm_address_max: Annotated[int, Field(ge=2)] = 100
    """EVM transactions signed for one address (per chain) within the window."""


class FanRule(_RiskRule):
    severity: Severity = "medium"
    """Severity of its events."""
    window_seconds: Annotated[int, Field(ge=60)] = 3600
    """Within this long."""
    out_payees: Annotated[int, Field(ge=2)] = 10
    """Fan-out: distinct payees, none of them paid by the wallet before the window, that one wallet pays."""
    in_payers: Annotated[int, Field(ge=2)] = 20
    """Fan-in: distinct wallets paying one wallet."""


class DormantRule(_RiskRule):
    severity: Severity = "medium"
    """Severity of its events."""
    idle_days: Annotated[int, Field(ge=1)] = 180
    """A wallet with no transfer, cash-in or cash-out for this long is dormant."""
    min_fen: Annotated[int, Field(ge=1)] = 1_000_000
    """A transfer out or cash-out of at least this much (¥10,000) from a dormant wallet raises an event."""


class EvmRecipientRule(_RiskRule):
    severity: Severity = "medium"
    """Severity of its events."""
    min_units: Annotated[int, Field(ge=0)] = 10_000
    """A transaction of at least this many whole tokens or coins (the amount in base units over
    10^decimals) to a recipient the gateway has never signed a transaction for raises an event."""


class RefusalsRule(_RiskRule):
    severity: Severity = "medium"
    """Severity of its events."""
    min_count: Annotated[int, Field(ge=2)] = 5
    """Permission or policy refusals (403, 422) of one API client or user that raise an event."""
    window_seconds: Annotated[int, Field(ge=10)] = 600
    """Within this long."""


class FrozenPayeeRule(_RiskRule):
    severity: Severity = "high"
    """Severity of its events."""
    min_devices: Annotated[int, Field(ge=2)] = 2
    """Distinct hard wallets frozen by reconciliation that paid one payee device, raising an event."""
    window_seconds: Annotated[int, Field(ge=60)] = 7 * 24 * 3600
    """Freezes within this long."""


def _default_notable() -> dict[str, Severity]:
    return {"hsm.outage": "high", "audit.verify_failed": "critical", "evm.nonce_set": "medium",
            "discrepancy.raised": "medium", "device.frozen": "medium", "device.revoked": "low",
            "login.locked": "low", "approval.rejected": "low", "attestation.already_financed": "high",
            "attestation.double_financed": "critical"}


class RiskSettings(_Section):
    """Risk monitoring and early warning (``[risk]``, docs/risk.md): the monitor and its rules."""

    monitor: bool = True
    """Run the rules from this process (off the request path, one evaluator at a time across processes and
    instances); signals are written with their decisions either way."""
    evaluator: Literal["process", "inline"] = "process"
    """Where this process runs the rules: ``process``, a spawned process of their own (started by the first
    HTTP process and restarted if it dies), so that the rules never share the requests' interpreter lock
    (BENCHMARKS.md, "Session 8"); ``inline``, a task of the HTTP process itself."""
    poll_seconds: Annotated[float, Field(gt=0, le=60)] = 1.0
    """How often the monitor looks for signals committed by other processes or instances (its own
    process's commits wake it at once)."""
    settle_seconds: Annotated[float, Field(ge=0, le=5)] = 0.2
    """After a wake-up the monitor waits this long, so that a burst is evaluated in one batch."""
    batch_max: Annotated[int, Field(ge=1, le=10_000)] = 1000
    """Most signals evaluated in one transaction."""
    lease_seconds: Annotated[float, Field(ge=1, le=600)] = 10.0
    """The evaluator's lease (``risk_monitor_lease``): one process of all instances evaluates; if it dies,
    another takes over once this long has passed without a renewal."""
    heartbeat_seconds: Annotated[float, Field(gt=0, le=300)] = 15.0
    """``GET /v1/risk/stream`` sends a comment line this often when there is no event, so that proxies keep
    the connection and clients notice a dead one."""
    structuring: StructuringRule = StructuringRule()
    """Amounts split to stay just under an approval threshold."""
    velocity: VelocityRule = VelocityRule()
    """Bursts per wallet, API client or user, hard wallet and EVM address."""
    fan: FanRule = FanRule()
    """One wallet paying many new payees, or many wallets paying one."""
    dormant: DormantRule = DormantRule()
    """A large movement out of a long-idle wallet."""
    evm_recipient: EvmRecipientRule = EvmRecipientRule()
    """A large EVM transaction to a recipient never paid before."""
    refusals: RefusalsRule = RefusalsRule()
    """Repeated permission or policy refusals for one API client or user."""
    frozen_payee: FrozenPayeeRule = FrozenPayeeRule()
    """One payee receiving from several hard wallets frozen by reconciliation."""
    notable: dict[str, Severity] = Field(default_factory=_default_notable)
    """Signal kinds that are an event by themselves (rule ``notable``), with their severity: an HSM outage,
    an audit verify failure, an admin nonce change, a discrepancy, a freeze or revocation, a login lockout,
    a rejected approval, a refused second financing of a document, and a double financing found after the
    fact in a peer's batch. Remove a kind to silence it."""


class EvmRpcSettings(_Section):
    """The Ethereum JSON-RPC signer (``POST /v1/evm/rpc``, docs/evm.md)."""

    default_chain_id: Annotated[int, Field(ge=1, le=2**53)] | None = None
    """The chain ``eth_chainId`` answers, and the chain of a call that names none (a transaction without
    ``chainId``, typed data whose domain has no ``chainId``); it must be in ``[[evm.chains]]``. Unset:
    ``eth_chainId`` and such calls are refused (``evm-rpc-no-default-chain``)."""
    upstream_url: Annotated[str, Field(pattern=r"^https?://[^\s]+$")] | None = None
    """JSON-RPC URL of an Ethereum node of ``default_chain_id``. Set: ``eth_sendTransaction`` signs and
    sends with ``eth_sendRawTransaction`` there, after a read-only ``eth_getTransactionCount`` check of
    the local nonce. Unset: ``eth_sendTransaction`` is refused. Put no credentials in the URL (it is no secret)."""
    upstream_timeout_seconds: Annotated[float, Field(gt=0, le=120)] = 10.0
    """Longest wait for one answer of the upstream node."""
    max_batch: Annotated[int, Field(ge=1, le=1000)] = 20
    """Most calls in one JSON-RPC batch; a larger batch is refused whole (-32600)."""

    @model_validator(mode="after")
    def _node_has_a_chain(self) -> EvmRpcSettings:
        if self.upstream_url is not None and self.default_chain_id is None:
            raise ValueError("upstream_url needs default_chain_id: the chain its node serves")
        return self


MEMBER_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class AlliancePeer(BaseModel):
    """One alliance member this gateway pulls fingerprints from (``[[alliance.peers]]``)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    member_id: Annotated[str, Field(pattern=MEMBER_ID_PATTERN)]
    """The member's id, as its attestations and fingerprint batches name it."""
    url: Annotated[str, Field(pattern=r"^https?://[^\s]+$")]
    """Base URL of the member's gateway; the sync pulls ``{url}/v1/alliance/fingerprints``."""
    public_key_pem: str
    """The member's ``attest`` public key (PEM, P-256 or Ed25519), exchanged at the key ceremony: the only
    key its batches and attestations are verified with."""
    api_key_file: Path | None = None
    """File (mode 0600) holding the API key of the ``peer`` client the member made for this bank, sent as a
    bearer token; none = the request goes without credentials."""

    @field_validator("public_key_pem")
    @classmethod
    def _p256_or_ed25519(cls, value: str) -> str:
        try:
            key = serialization.load_pem_public_key(value.encode())
        except (ValueError, TypeError):
            raise ValueError("not a PEM public key") from None
        if not (isinstance(key, ed25519.Ed25519PublicKey)
                or (isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1))):
            raise ValueError("the member's attest key must be P-256 or Ed25519")
        return value


class AllianceSettings(_Section):
    """Trade-finance attestations and the alliance's double-financing check (``[alliance]``,
    docs/trade-finance.md)."""

    member_id: Annotated[str, Field(pattern=MEMBER_ID_PATTERN)] | None = None
    """This bank's member id in the alliance, signed into every attestation and batch; attestations are
    refused (503 ``alliance-not-configured``) until it is set."""
    hmac_key_label: Annotated[str, Field(min_length=1, max_length=64)] = "ecny-alliance-fingerprint"
    """CKA_LABEL of the alliance's HMAC-SHA256 secret key in the HSM (``ecny-gateway alliance import-key``);
    every member holds the same key under its own HSM."""
    key_id: str | None = None
    """Key family that signs attestations and fingerprint batches (its newest version); by default the active
    ``attest`` key."""
    peers: list[AlliancePeer] = []
    """The other members: id, URL, public key and credential of each."""
    sync_interval_seconds: Annotated[float, Field(ge=0)] = 60.0
    """Pull every peer this often (0: only ``ecny-gateway alliance sync``). A double financing across two
    banks can slip through for up to this long plus a peer's downtime (docs/trade-finance.md)."""
    batch_limit: Annotated[int, Field(ge=1, le=10_000)] = 1000
    """Most fingerprints one published batch carries (a sync pulls batches until it has the peer's head)."""
    batch_max_age_seconds: Annotated[int, Field(ge=1, le=3600)] = 120
    """A batch issued longer ago than this (or this far in the future) is refused as stale."""
    request_timeout_seconds: Annotated[float, Field(gt=0, le=300)] = 10.0
    """Longest wait for one peer's answer."""

    @model_validator(mode="after")
    def _peers_distinct(self) -> AllianceSettings:
        ids = [peer.member_id for peer in self.peers]
        if len(set(ids)) != len(ids):
            raise ValueError("alliance.peers: each member_id at most once")
        if self.member_id is not None and self.member_id in ids:
            raise ValueError("alliance.peers: this bank's own member_id is not a peer")
        return self


class Settings(_Section):
    """The whole configuration."""

    server: ServerSettings = ServerSettings()
    hsm: HsmSettings = HsmSettings()
    store: StoreSettings = StoreSettings()
    audit: AuditSettings = AuditSettings()
    auth: AuthSettings = AuthSettings()
    logging: LoggingSettings = LoggingSettings()
    wallets: WalletSettings = WalletSettings()
    approvals: ApprovalSettings = ApprovalSettings()
    ecny: EcnySettings = EcnySettings()
    offline: OfflineSettings = OfflineSettings()
    evm: EvmSettings = EvmSettings()
    risk_delivery: RiskDeliverySettings = RiskDeliverySettings()
    risk_webhooks: Annotated[list[RiskWebhookSettings], AfterValidator(_unique_names)] = []
    """Receivers of risk events as signed CloudEvents (``[[risk_webhooks]]``, one table each)."""
    risk: RiskSettings = RiskSettings()
    evm_rpc: EvmRpcSettings = EvmRpcSettings()
    alliance: AllianceSettings = AllianceSettings()

    @model_validator(mode="after")
    def _rpc_chain_registered(self) -> Settings:
        chain_id = self.evm_rpc.default_chain_id
        if chain_id is not None and self.evm.chain(chain_id) is None:
            raise ValueError(f"evm_rpc.default_chain_id {chain_id} is not in [[evm.chains]]")
        return self


def _env_overrides(environ: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    overrides: dict[str, dict[str, Any]] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        section, _, key = name.removeprefix(ENV_PREFIX).lower().partition("__")
        if section not in Settings.model_fields:
            continue
        if value.startswith(("{", "[")):
            try:
                overrides.setdefault(section, {})[key] = json.loads(value)
                continue
            except ValueError:
                pass
        overrides.setdefault(section, {})[key] = value
    return overrides


def load_settings(path: Path | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Read settings from ``path`` (if any) and the environment.

    Raises:
        ConfigError: unreadable file, unknown key or bad value — naming the file or variable and key.
    """
    environ = os.environ if environ is None else environ
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"{path}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: {exc}") from exc
    for section, values in _env_overrides(environ).items():
        current = data.setdefault(section, {})
        if not isinstance(current, dict):  # a list of tables ([[risk_webhooks]]) has no KEY to override
            raise ConfigError(f"{section}: a list of tables; set it in the file, not with "
                              f"{ENV_PREFIX}{section.upper()}__*")
        current.update(values)
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            key = ".".join(str(part) for part in error["loc"])
            variable = ENV_PREFIX + "__".join(str(p).upper() for p in error["loc"][:2])
            problems.append(f"{key}: {error['msg']} (from {source} or {variable})")
        raise ConfigError("; ".join(problems)) from exc
