"""HSM family profiles (``gateway/hsm/profiles/*.toml``, shipped in the wheel; ``hsm_profiles/`` in a
checkout is a link to them).

A profile says how to drive one family of HSM through PKCS#11: where the module is, how to find
the token, which algorithms it signs and with which mechanism, how signatures come back, how
many sessions it tolerates and which attributes generated keys get. Mechanism choices live
here, never in code. A profile that is incomplete or contradicts itself is refused with a
message naming the file and the key.
"""

from __future__ import annotations

import tomllib
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gateway.errors import ConfigError
from gateway.hsm.uri import Pkcs11Uri, Pkcs11UriError
from gateway.hsm.uri import parse as parse_uri
from gateway.signing import Algorithm

#: Curve object identifiers each algorithm must use; a profile that names another is contradictory.
CURVE_OIDS: dict[Algorithm, str] = {
    Algorithm.ECDSA_P256: "1.2.840.10045.3.1.7",
    Algorithm.ECDSA_SECP256K1: "1.3.132.0.10",
    Algorithm.ED25519: "1.3.101.112",
    Algorithm.SM2: "1.2.156.10197.1.301",
}

#: Standard PKCS#11 constants a profile may name instead of giving a number.
KEY_TYPES: dict[str, int] = {"EC": 0x3, "EC_EDWARDS": 0x40}
MECHANISMS: dict[str, int] = {
    "ECDSA": 0x1041,
    "ECDSA_SHA256": 0x1044,
    "EDDSA": 0x1057,
    "EC_KEY_PAIR_GEN": 0x1040,
    "EC_EDWARDS_KEY_PAIR_GEN": 0x1055,
}
#: First value of the PKCS#11 vendor-defined range (CKK_VENDOR_DEFINED / CKM_VENDOR_DEFINED).
VENDOR_DEFINED = 0x80000000


def _constant(value: str | int, table: dict[str, int], what: str) -> int:
    if isinstance(value, int):
        return value
    text = value.strip()
    if text.lower().startswith("0x"):
        return int(text, 16)
    if text in table:
        return table[text]
    raise ValueError(f"unknown {what} {value!r}; use one of {sorted(table)} or a hex number")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class ModuleSection(_Strict):
    path: str
    """Absolute path of the vendor's PKCS#11 module; the gateway config may override it."""
    p11_kit_proxy: bool = False
    """Load the module through p11-kit-proxy (needed where the module does not lock for threads)."""
    notes: str = ""
    """Where the module comes from and anything an operator must install or configure."""


class TokenSection(_Strict):
    label: str | None = None
    """Token label to open (CKA_LABEL of the token)."""
    uri: str | None = None
    """PKCS#11 URI (RFC 7512) naming the token, e.g. ``pkcs11:token=ecny;serial=0123``; used when no
    label. Every token attribute it gives (token, manufacturer, serial, model, slot-*, library-*)
    must match; object attributes, ``pin-value`` and ``pin-source`` are refused."""

    @model_validator(mode="after")
    def _one_way(self) -> TokenSection:
        if not self.label and not self.uri:
            raise ValueError("give token.label or token.uri")
        if self.uri is not None:
            parsed = self.parsed_uri()
            if parsed is not None and not parsed.token_attributes():
                raise ValueError("token.uri names no token: give at least token=, serial= or slot-id=")
        return self

    def parsed_uri(self) -> Pkcs11Uri | None:
        """``uri`` parsed and checked for a profile; None without one.

        Raises:
            ValueError: not a PKCS#11 URI, an object attribute, a PIN in it, an unknown path attribute.
        """
        if self.uri is None:
            return None
        try:
            parsed = parse_uri(self.uri)
            parsed.refuse_pin_value("token.uri")
            parsed.refuse_unknown_path("token.uri")
        except Pkcs11UriError as exc:
            raise ValueError(str(exc)) from None
        if parsed.names_an_object():
            raise ValueError("token.uri names a token: object, type and id do not belong in it")
        if parsed.pin_source is not None:
            raise ValueError("token.uri: pin-source is not read from a profile; give the PIN as hsm.pin_file "
                             "or ECNY_HSM__PIN")
        return parsed

    def resolved_label(self) -> str:
        """The token label, taken from ``label`` or the ``token=`` attribute of the URI ("" when the URI
        names the token by other attributes only, e.g. its serial)."""
        if self.label:
            return self.label
        parsed = self.parsed_uri()
        assert parsed is not None
        return parsed.token or ""

    def match_attributes(self) -> dict[str, str]:
        """The token attributes besides the label that the URI requires (serial, manufacturer, model,
        slot-id, …); empty when the token is named by ``label``."""
        if self.label:
            return {}
        parsed = self.parsed_uri()
        assert parsed is not None
        return {name: value for name, value in parsed.token_attributes().items() if name != "token"}


class SessionsSection(_Strict):
    max_sessions: Annotated[int, Field(ge=1)]
    """Sessions the HSM (or its licence) tolerates for this application."""
    workers: Annotated[int, Field(ge=1)]
    """Signer worker processes to start; each keeps one logged-in session."""
    thread_safe: bool = False
    """True if the module may be called from several threads at once (never assumed for SoftHSM2)."""

    @model_validator(mode="after")
    def _fits(self) -> SessionsSection:
        if self.workers > self.max_sessions:
            raise ValueError(f"workers ({self.workers}) exceeds max_sessions ({self.max_sessions})")
        return self


class AlgorithmSection(_Strict):
    key_type: str | int
    """CKK_* key type: EC, EC_EDWARDS or a vendor-defined hex number."""
    curve_oid: str
    """Named curve OID placed in CKA_EC_PARAMS."""
    sign_mechanism: str | int
    """CKM_* signing mechanism: ECDSA, EDDSA or a vendor-defined hex number."""
    input: Literal["digest", "message"]
    """``digest``: the gateway hashes and the HSM signs the digest; ``message``: the HSM hashes."""
    hash: Literal["sha256", "keccak256", "sm3", "none"] = "none"
    """Hash the gateway applies before a ``digest`` mechanism; ``none`` for ``message`` mechanisms."""
    signature_encoding: Literal["raw", "der"]
    """How the module returns signatures: raw r‖s or DER SEQUENCE{r, s}."""
    cose_alg: int | None = None
    """COSE algorithm identifier for this key type (ES256=-7, EdDSA=-8, a private-use value for SM2)."""

    @property
    def key_type_value(self) -> int:
        return _constant(self.key_type, KEY_TYPES, "key type")

    @property
    def sign_mechanism_value(self) -> int:
        return _constant(self.sign_mechanism, MECHANISMS, "mechanism")

    @field_validator("key_type")
    @classmethod
    def _known_key_type(cls, value: str | int) -> str | int:
        _constant(value, KEY_TYPES, "key type")
        return value

    @field_validator("sign_mechanism")
    @classmethod
    def _known_mechanism(cls, value: str | int) -> str | int:
        _constant(value, MECHANISMS, "mechanism")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> AlgorithmSection:
        if self.input == "digest" and self.hash == "none":
            raise ValueError("input = 'digest' needs a hash the gateway applies")
        if self.input == "message" and self.hash != "none":
            raise ValueError("input = 'message' means the HSM hashes: set hash = 'none'")
        return self


class KeyTemplates(_Strict):
    private: dict[str, bool]
    """Attributes set on generated private keys (names of CKA_* without the prefix, lower case)."""
    public: dict[str, bool]
    """Attributes set on generated public keys."""

    @field_validator("private")
    @classmethod
    def _protected(cls, value: dict[str, bool]) -> dict[str, bool]:
        required = {"sensitive": True, "extractable": False, "token": True, "sign": True}
        for name, wanted in required.items():
            if value.get(name) is not wanted:
                raise ValueError(f"private key template must set {name} = {str(wanted).lower()}")
        return value


class HsmProfile(_Strict):
    """One HSM family."""

    name: str
    """Human name of the family, e.g. 'Thales Luna Network HSM 7'."""
    vendor: str
    """Manufacturer."""
    tested: bool = False
    """True only for profiles exercised by this project's test suite."""
    documentation: str = ""
    """The vendor documentation the profile was written from."""
    module: ModuleSection
    token: TokenSection
    sessions: SessionsSection
    algorithms: dict[Algorithm, AlgorithmSection]
    """Supported algorithms and how each is driven."""
    key_templates: KeyTemplates

    @model_validator(mode="after")
    def _curves_match(self) -> HsmProfile:
        if not self.algorithms:
            raise ValueError("algorithms: a profile must support at least one algorithm")
        for algorithm, section in self.algorithms.items():
            if section.curve_oid != CURVE_OIDS[algorithm]:
                raise ValueError(
                    f"algorithms.{algorithm}.curve_oid {section.curve_oid} is not the curve of {algorithm} "
                    f"({CURVE_OIDS[algorithm]})"
                )
            if algorithm is Algorithm.ED25519 and section.signature_encoding != "raw":
                raise ValueError(f"algorithms.{algorithm}.signature_encoding: EdDSA signatures are raw")
            if algorithm is Algorithm.SM2 and section.key_type_value < VENDOR_DEFINED and section.key_type != "EC":
                raise ValueError(f"algorithms.{algorithm}.key_type must be EC or vendor-defined")
        return self

    def cose_alg(self, algorithm: Algorithm) -> int | None:
        """The COSE algorithm number this profile gives ``algorithm`` (SM2's private-use value), or None
        where the registered one applies (:func:`gateway.schemes.cose.cose_alg`)."""
        section = self.algorithms.get(algorithm)
        return section.cose_alg if section is not None else None


def _format_location(error: dict[str, object]) -> str:
    return ".".join(str(part) for part in error["loc"])  # type: ignore[attr-defined]


def load_profile(path: Traversable) -> HsmProfile:
    """Read and validate one profile.

    Args:
        path: the TOML file (a path, or a file inside the installed package).
    Returns:
        The validated profile.
    Raises:
        ConfigError: unreadable TOML, a missing key or a contradiction — the message names the file
            and the key.
    """
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    try:
        return HsmProfile.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{_format_location(e)}: {e['msg']}" for e in exc.errors())  # type: ignore[arg-type]
        raise ConfigError(f"{path}: {problems}") from exc


def shipped_profiles() -> Traversable:
    """The profiles shipped with the package (``gateway/hsm/profiles``), found through
    :mod:`importlib.resources` so that an installed wheel finds them as a checkout does."""
    return resources.files("gateway.hsm") / "profiles"


def profiles_dir() -> Path:
    """:func:`shipped_profiles` as a directory on disk (the package is installed as files, never zipped)."""
    return Path(str(shipped_profiles()))


def load_named_profile(name: str) -> HsmProfile:
    """The profile ``hsm.profile`` names: a shipped profile's name (``softhsm`` → ``softhsm.toml``)
    or a path to a profile file.

    Raises:
        ConfigError: no such file, or the profile is invalid (:func:`load_profile`).
    """
    candidate: Traversable = Path(name)
    if Path(name).suffix != ".toml":
        candidate = shipped_profiles() / f"{name}.toml"
    if not candidate.is_file():
        raise ConfigError(f"hsm.profile: no profile file {candidate}")
    return load_profile(candidate)
