"""HSM family profiles: every shipped profile loads, and broken profiles are refused with a message
that names the file and the offending key. No HSM is needed."""

from __future__ import annotations

import copy
import json
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.errors import ConfigError
from gateway.hsm.profile import HsmProfile, TokenSection, load_profile, profiles_dir
from gateway.signing import Algorithm

PROFILES_DIR = profiles_dir()
PROFILE_FILES = sorted(PROFILES_DIR.glob("*.toml"))
EXPECTED_FILES = {
    "softhsm.toml",
    "thales-luna.toml",
    "utimaco.toml",
    "entrust-nshield.toml",
    "aws-cloudhsm.toml",
    "yubihsm2.toml",
    "tpm2-pkcs11.toml",
    "gm-sm2.toml",
}

# --- a tiny TOML writer (enough for profiles: tables, strings, booleans, integers) ---------------

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _key(name: str) -> str:
    return name if _BARE_KEY.match(name) else json.dumps(name)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    raise TypeError(f"cannot write {value!r} as TOML")


def dump_toml(data: dict[str, Any], prefix: tuple[str, ...] = ()) -> str:
    """Scalars of a table first, then its sub-tables as ``[a.b]`` headers."""
    lines: list[str] = []
    if prefix:
        lines.append(f"[{'.'.join(_key(part) for part in prefix)}]")
    lines += [f"{_key(k)} = {_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    text = "\n".join(lines) + "\n"
    for k, v in data.items():
        if isinstance(v, dict):
            text += "\n" + dump_toml(v, (*prefix, k))
    return text


def softhsm_data() -> dict[str, Any]:
    return tomllib.loads((PROFILES_DIR / "softhsm.toml").read_text(encoding="utf-8"))


def test_writer_round_trips_softhsm() -> None:
    data = softhsm_data()
    assert tomllib.loads(dump_toml(data)) == data


# --- the shipped profiles ------------------------------------------------------------------------


def test_profile_set_is_complete() -> None:
    names = {path.name for path in PROFILE_FILES}
    assert len(PROFILE_FILES) >= 8
    assert EXPECTED_FILES <= names, f"missing: {sorted(EXPECTED_FILES - names)}"


@pytest.mark.parametrize("path", PROFILE_FILES, ids=lambda p: p.name)
def test_profile_loads(path: Path) -> None:
    profile = load_profile(path)
    assert isinstance(profile, HsmProfile)
    assert len(profile.algorithms) >= 1
    assert profile.sessions.workers <= profile.sessions.max_sessions
    assert profile.module.path
    assert profile.token.resolved_label()
    for section in profile.algorithms.values():
        # the constants resolve to numbers the worker can pass to PKCS#11
        assert section.key_type_value >= 0
        assert section.sign_mechanism_value >= 0
    private = profile.key_templates.private
    assert private["token"] is True
    assert private["sensitive"] is True
    assert private["extractable"] is False
    assert private["sign"] is True
    # only the profile the test suite exercises may claim to be tested
    assert profile.tested is (path.name == "softhsm.toml")


def test_only_softhsm_is_tested() -> None:
    tested = [path.name for path in PROFILE_FILES if load_profile(path).tested]
    assert tested == ["softhsm.toml"]


def test_vendor_hex_constants_parse() -> None:
    sm2 = load_profile(PROFILES_DIR / "gm-sm2.toml").algorithms[Algorithm.SM2]
    assert sm2.key_type_value == 0x80000004
    assert sm2.sign_mechanism_value == 0x80008100
    assert sm2.input == "message"
    assert sm2.hash == "none"
    assert sm2.curve_oid == "1.2.156.10197.1.301"
    assert sm2.cose_alg is not None and sm2.cose_alg < -65536  # COSE private-use range


def test_token_uri_resolves_label() -> None:
    token = TokenSection(uri="pkcs11:token=My%20Token;manufacturer=x")
    assert token.resolved_label() == "My Token"


def test_token_label_wins_over_uri() -> None:
    assert TokenSection(label="a", uri="pkcs11:token=b").resolved_label() == "a"


# --- broken profiles -----------------------------------------------------------------------------

Mutation = Callable[[dict[str, Any]], None]


def _set(*path_and_value: Any) -> Mutation:
    *path, value = path_and_value

    def mutate(data: dict[str, Any]) -> None:
        table = data
        for part in path[:-1]:
            table = table[part]
        table[path[-1]] = value

    return mutate


def _delete(*path: str) -> Mutation:
    def mutate(data: dict[str, Any]) -> None:
        table = data
        for part in path[:-1]:
            table = table[part]
        del table[path[-1]]

    return mutate


def _token(**fields: str) -> Mutation:
    def mutate(data: dict[str, Any]) -> None:
        data["token"] = dict(fields)

    return mutate


# (case id, mutation, key path the message must name)
BROKEN: list[tuple[str, Mutation, str]] = [
    ("missing-module-path", _delete("module", "path"), "module.path"),
    ("workers-exceed-sessions", _set("sessions", "workers", 65), "sessions"),
    (
        "extractable-private-key",
        _set("key_templates", "private", "extractable", True),
        "key_templates.private",
    ),
    ("sensitive-missing", _delete("key_templates", "private", "sensitive"), "key_templates.private"),
    (
        "ed25519-with-p256-oid",
        _set("algorithms", "ed25519", "curve_oid", "1.2.840.10045.3.1.7"),
        "algorithms.ed25519.curve_oid",
    ),
    ("ed25519-der", _set("algorithms", "ed25519", "signature_encoding", "der"), "algorithms.ed25519"),
    ("digest-without-hash", _set("algorithms", "ecdsa-p256", "hash", "none"), "algorithms.ecdsa-p256"),
    ("message-with-hash", _set("algorithms", "ed25519", "hash", "sha256"), "algorithms.ed25519"),
    (
        "unknown-mechanism",
        _set("algorithms", "ecdsa-p256", "sign_mechanism", "ECDSA_FOO"),
        "algorithms.ecdsa-p256.sign_mechanism",
    ),
    # a mechanism name where a key type belongs (and the reverse) is as wrong as an unknown name
    (
        "mechanism-as-key-type",
        _set("algorithms", "ecdsa-p256", "key_type", "ECDSA"),
        "algorithms.ecdsa-p256.key_type",
    ),
    (
        "key-type-as-mechanism",
        _set("algorithms", "ecdsa-p256", "sign_mechanism", "EC"),
        "algorithms.ecdsa-p256.sign_mechanism",
    ),
    ("unknown-top-level-key", _set("colour", "blue"), "colour"),
    ("unknown-nested-key", _set("sessions", "max_session", 3), "sessions.max_session"),
    ("token-without-label-or-uri", _token(), "token"),
    ("token-uri-not-pkcs11", _token(uri="https://hsm.example/token"), "token"),
    ("unknown-algorithm", _set("algorithms", "rsa-2048", {}), "algorithms.rsa-2048"),
    ("no-algorithms", _set("algorithms", {}), "algorithms"),
]


@pytest.mark.parametrize(
    ("mutate", "key_path"), [(m, k) for _, m, k in BROKEN], ids=[c for c, _, _ in BROKEN]
)
def test_broken_profile_is_refused(tmp_path: Path, mutate: Mutation, key_path: str) -> None:
    data = copy.deepcopy(softhsm_data())
    mutate(data)
    path = tmp_path / "broken.toml"
    path.write_text(dump_toml(data), encoding="utf-8")

    with pytest.raises(ConfigError) as excinfo:
        load_profile(path)

    message = str(excinfo.value)
    assert str(path) in message
    assert key_path in message


def test_invalid_toml_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    text = (PROFILES_DIR / "softhsm.toml").read_text(encoding="utf-8")
    path.write_text(text.replace('name = "SoftHSM2"', 'name = "SoftHSM2'), encoding="utf-8")

    with pytest.raises(ConfigError) as excinfo:
        load_profile(path)

    message = str(excinfo.value)
    assert str(path) in message
    assert "line" in message  # tomllib says where the syntax breaks


def test_missing_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as excinfo:
        load_profile(path)
    assert str(path) in str(excinfo.value)
