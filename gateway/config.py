"""Settings: a TOML file, then ``ECNY_<SECTION>__<KEY>`` environment variables over it.

Every field has a docstring: that text is the reference for operators. PINs are secrets: they come
from ``ECNY_HSM__PIN`` or ``hsm.pin_file``, never from the command line, and never show in reprs.
Errors name the file (or variable) and the key.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from gateway.errors import ConfigError
from gateway.policy.chains import EvmSettings
from gateway.policy.limits import DEFAULT_TIERS, TierLimits

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
        data.setdefault(section, {}).update(values)
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            key = ".".join(str(part) for part in error["loc"])
            variable = ENV_PREFIX + "__".join(str(p).upper() for p in error["loc"][:2])
            problems.append(f"{key}: {error['msg']} (from {source} or {variable})")
        raise ConfigError("; ".join(problems)) from exc
