"""Settings: a TOML file, then ``ECNY_<SECTION>__<KEY>`` environment variables over it.

Every field has a docstring: that text is the reference for operators. PINs are secrets: they come
from ``ECNY_HSM__PIN`` or ``hsm.pin_file``, never from the command line, and never show in reprs.
Errors name the file (or variable) and the key.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from gateway.errors import ConfigError
from gateway.hsm.profile import HsmProfile, load_profile, profiles_dir
from gateway.offline.settings import OfflineSettings

if TYPE_CHECKING:
    from gateway.policy.limits import TierLimits as TierLimitsType

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
    """Profile name in ``hsm_profiles/`` (``softhsm`` → ``softhsm.toml``) or a path to a profile file."""
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

    def load_profile(self) -> HsmProfile:
        candidate = Path(self.profile)
        if candidate.suffix != ".toml":
            candidate = profiles_dir() / f"{self.profile}.toml"
        if not candidate.is_file():
            raise ConfigError(f"hsm.profile: no profile file {candidate}")
        return load_profile(candidate)

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
    from gateway.policy.limits import DEFAULT_TIERS

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

    def limits(self, tier: int) -> "TierLimitsType":
        from gateway.policy.limits import TierLimits

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


def _base_units(value: Any) -> Any:
    """EVM amounts in config: an integer, or a decimal string of base units (TOML integers stop at 2**63)."""
    if isinstance(value, bool | float):
        raise ValueError("an integer or a decimal string of base units, never a float")
    if isinstance(value, str):
        if not value.isascii() or not value.isdigit():
            raise ValueError("a decimal string of base units (digits only)")
        return int(value)
    return value


def _evm_address(value: Any) -> str:
    """An address in EIP-55 form; a mixed-case address with a wrong checksum is refused."""
    from gateway.errors import InvalidAddress
    from gateway.schemes.evm.values import checksum, parse_address

    try:
        return checksum(parse_address(value))
    except InvalidAddress as exc:
        raise ValueError(exc.detail) from None


BaseUnits = Annotated[int, BeforeValidator(_base_units), Field(ge=0, le=2**256 - 1)]
EvmAddress = Annotated[str, BeforeValidator(_evm_address)]


class EvmTokenSettings(_Section):
    address: EvmAddress
    """Token contract address (a mixed-case address must pass its EIP-55 checksum)."""
    symbol: Annotated[str, Field(min_length=1, max_length=16)]
    """Ticker shown to supervisors and in ``GET /v1/evm/chains``."""
    decimals: Annotated[int, Field(ge=0, le=36)]
    """Decimals of the token; amounts in requests and here are always in base units."""
    per_tx_cap: BaseUnits | None = None
    """Largest amount one transaction may name (transfer, approve, mint, burn), in base units; none = no cap."""
    daily_cap: BaseUnits | None = None
    """Largest sum of amounts per signing address and UTC day, in base units; none = no cap."""
    approval_threshold: BaseUnits | None = None
    """Amounts above this wait for a supervisor's approval (maker-checker); none = never."""
    example: bool = False
    """Shipped as an example: check the address and caps before relying on it."""


class EvmNativeSettings(_Section):
    symbol: str = "ETH"
    """Ticker of the chain's native coin."""
    decimals: Annotated[int, Field(ge=0, le=36)] = 18
    """Decimals of the native coin (18 on every EVM chain shipped)."""
    per_tx_cap: BaseUnits | None = None
    """Largest ``value`` (wei) of one transaction; none = no cap."""
    daily_cap: BaseUnits | None = None
    """Largest sum of ``value`` (wei) per signing address and UTC day; none = no cap."""


class TypedDataDomainSettings(_Section):
    verifying_contract: EvmAddress
    """EIP-712 ``verifyingContract`` that may be signed for (with the chain's id as ``chainId``)."""
    name: str | None = None
    """When set, the domain's ``name`` must equal it."""
    version: str | None = None
    """When set, the domain's ``version`` must equal it."""
    primary_types: list[Annotated[str, Field(pattern=r"^[A-Za-z_$][A-Za-z0-9_$]*$", max_length=64)]] = []
    """EIP-712 ``primaryType`` names other than the standard authorisations that may be signed for this
    domain — each request always through a supervisor's approval, since the gateway cannot read what
    they do. ``Permit``, ``TransferWithAuthorization`` and ``ReceiveWithAuthorization`` are never listed:
    they are decoded and meet the token's caps. Empty (the default): nothing else is signed."""

    @field_validator("primary_types")
    @classmethod
    def _not_decoded(cls, names: list[str]) -> list[str]:
        decoded = sorted({"Permit", "TransferWithAuthorization", "ReceiveWithAuthorization", "EIP712Domain"}
                         & set(names))
        if decoded:
            raise ValueError(f"{', '.join(decoded)} cannot be listed: standard authorisations are decoded "
                             "and checked against the token's caps")
        return names


class EvmFeeSettings(_Section):
    """Caps on what one transaction may pay for gas, in wei. A request above any of them is refused
    (``evm-fee-cap-exceeded``); the fee also counts against the native coin's caps."""

    max_fee_per_gas: BaseUnits = 500 * 10**9
    """Largest ``max_fee_per_gas`` (EIP-1559) or ``gas_price`` (legacy), in wei: 500 gwei by default,
    above Ethereum's worst spikes of recent years."""
    max_gas_limit: Annotated[int, Field(ge=21_000, le=100_000_000)] = 1_000_000
    """Largest ``gas_limit``: an ERC-20 call needs under 100,000, a value transfer 21,000."""
    max_total_fee: BaseUnits = 10**17
    """Largest gas limit × fee per gas (the most the transaction can burn), in wei: 0.1 of the native
    coin by default."""


class EvmChainSettings(_Section):
    chain_id: Annotated[int, Field(ge=1, le=2**53)]
    """EIP-155 chain id; requests name the chain by it."""
    name: Annotated[str, Field(min_length=1, max_length=64)]
    """Human name of the chain."""
    native: EvmNativeSettings = EvmNativeSettings()
    """The native coin and its caps."""
    approval_threshold: BaseUnits | None = None
    """Native ``value`` (wei) above which a transaction waits for a supervisor's approval; none = never."""
    tokens: list[EvmTokenSettings] = []
    """ERC-20 tokens the gateway may sign for; calldata to any other contract is refused."""
    recipient_allowlist: list[EvmAddress] = []
    """When not empty, recipients and spenders must be on it."""
    recipient_denylist: list[EvmAddress] = []
    """Recipients and spenders that are always refused."""
    typed_data_domains: list[TypedDataDomainSettings] = []
    """EIP-712 domains that ``POST /v1/evm/typed-data`` may sign for on this chain."""
    fees: EvmFeeSettings = EvmFeeSettings()
    """Gas caps of one transaction on this chain (defaults: 500 gwei per gas, 1,000,000 gas, 0.1 coin)."""
    example: bool = False
    """Shipped as an example entry."""

    def token(self, address: str) -> EvmTokenSettings | None:
        """The registered token at ``address`` (EIP-55 form), or None."""
        return next((token for token in self.tokens if token.address == address), None)


def _default_chains() -> list[EvmChainSettings]:
    mainnet_native = EvmNativeSettings(symbol="ETH", per_tx_cap=100 * 10**18, daily_cap=1_000 * 10**18)

    def usd6(address: str, symbol: str) -> EvmTokenSettings:  # a dollar stablecoin with 6 decimals, as an example
        return EvmTokenSettings(address=address, symbol=symbol, decimals=6, per_tx_cap=1_000_000 * 10**6,
                                daily_cap=10_000_000 * 10**6, approval_threshold=100_000 * 10**6, example=True)

    return [
        EvmChainSettings(
            chain_id=1, name="Ethereum", native=mainnet_native, approval_threshold=10 * 10**18,
            tokens=[usd6("0xA0b86991c6218b36c1d19D4a2e9Eb0cE3606eB48", "USDC"),
                    usd6("0xdAC17F958D2ee523a2206206994597C13D831ec7", "USDT")],
            # USDC implements EIP-2612 permit; USDT on Ethereum does not.
            typed_data_domains=[TypedDataDomainSettings(verifying_contract="0xA0b86991c6218b36c1d19D4a2e9Eb0cE3606eB48")]),
        EvmChainSettings(
            chain_id=11155111, name="Sepolia", native=EvmNativeSettings(symbol="ETH"), approval_threshold=10**20,
            tokens=[usd6("0x1c7D4B196Cb0C7B01d743Fbc6116a902379C7238", "USDC")],
            typed_data_domains=[TypedDataDomainSettings(verifying_contract="0x1c7D4B196Cb0C7B01d743Fbc6116a902379C7238")]),
        EvmChainSettings(
            chain_id=1030, name="Conflux eSpace",
            native=EvmNativeSettings(symbol="CFX", per_tx_cap=1_000_000 * 10**18, daily_cap=10_000_000 * 10**18),
            approval_threshold=100_000 * 10**18,
            tokens=[usd6("0xfe97E85d13ABD9c1c33384E796F10B73905637cE", "USDT")]),
        EvmChainSettings(chain_id=71, name="Conflux eSpace Testnet", native=EvmNativeSettings(symbol="CFX")),
    ]


class EvmSettings(_Section):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True,
                              validate_assignment=True)

    chains: list[EvmChainSettings] = Field(default_factory=_default_chains)
    """The chain registry (``[[evm.chains]]``): a request for a chain not listed is refused. Shipped:
    Ethereum (1), Sepolia (11155111), Conflux eSpace (1030) and its testnet (71); their tokens are examples."""

    @field_validator("chains")
    @classmethod
    def _unique_chains(cls, chains: list[EvmChainSettings]) -> list[EvmChainSettings]:
        ids = [chain.chain_id for chain in chains]
        if len(ids) != len(set(ids)):
            raise ValueError("each chain_id may appear once")
        return chains

    def chain(self, chain_id: int) -> EvmChainSettings | None:
        """The registered chain with ``chain_id``, or None."""
        return next((chain for chain in self.chains if chain.chain_id == chain_id), None)


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
            import json

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
