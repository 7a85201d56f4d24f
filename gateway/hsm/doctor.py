"""``ecny-gateway hsm doctor``: check a device against its profile, as docs/hsm-profiles.md
("Before production") tells operators to do by hand with ``pkcs11-tool``.

The checks, in order (each stops the ones that depend on it):

1. the module loads (``pkcs11-tool --module M --show-info``);
2. the slots with a token, and the profile's token among them exactly once (``--list-slots``), with
   no PIN locked or on its final try;
3. every algorithm's signing mechanism with the sign flag, and the key-pair generation mechanism of
   its key type with the generate flag (``-M``);
4. login with the configured PIN (``--login``);
5. every private key on the token against the profile's private-key template, and never sensitive
   lost nor extractable ever (``--list-objects --type privkey``): a key made outside the gateway
   with weaker attributes is a problem.

It runs in the calling process, in one thread, with one session, and takes the same opening lock as
the signer workers (SoftHSM2 rewrites its token files on login).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from gateway.hsm.pool import PoolSettings, worker_config
from gateway.hsm.profile import KEY_TYPES, MECHANISMS, HsmProfile
from gateway.hsm.worker import _opening_alone  # the lock the signer workers take to open the token

Status = Literal["ok", "problem", "warning", "skipped"]

#: Key type → the key-pair generation mechanism PKCS#11 defines for it (vendor key types: not known).
KEY_PAIR_GEN = {KEY_TYPES["EC"]: MECHANISMS["EC_KEY_PAIR_GEN"],
                KEY_TYPES["EC_EDWARDS"]: MECHANISMS["EC_EDWARDS_KEY_PAIR_GEN"]}
#: Attributes every gateway private key must have whatever the profile's template says (the
#: gateway's own attribute check): it was never extractable and always sensitive.
ALWAYS_REQUIRED = {"always_sensitive": True, "never_extractable": True}
#: Token flags that mean the next wrong PIN (or none at all) may lock the gateway out.
PIN_FLAGS = ("USER_PIN_LOCKED", "USER_PIN_FINAL_TRY", "USER_PIN_COUNT_LOW", "USER_PIN_TO_BE_CHANGED")


@dataclass
class Check:
    """One line of the report."""

    check: str
    status: Status
    detail: str


@dataclass
class DoctorReport:
    """Every check made, in order; ``ok`` when none is a problem."""

    profile: str
    module_path: str
    token_label: str
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(check.status != "problem" for check in self.checks)

    def add(self, check: str, status: Status, detail: str) -> None:
        self.checks.append(Check(check, status, detail))

    def document(self) -> dict[str, Any]:
        return {"ok": self.ok, "profile": self.profile, "module_path": self.module_path,
                "token_label": self.token_label, "checks": [asdict(check) for check in self.checks]}


def _name(value: int) -> str:
    known = {number: name for name, number in MECHANISMS.items()}
    return f"CKM_{known[value]} ({value:#x})" if value in known else f"{value:#x}"


def diagnose(profile: HsmProfile, module_path: str, token_label: str, pin: str | None) -> DoctorReport:
    """Run the checks against the device; ``pin`` None skips login and the key checks (reported).

    Never raises for what it finds on the device: each finding is a line of the report.
    """
    import pkcs11  # loads the PKCS#11 binding only for this command, like the signer workers

    report = DoctorReport(profile.name, module_path, token_label)
    try:
        lib = pkcs11.lib(module_path)
    except (RuntimeError, OSError) as exc:
        report.add("module", "problem", f"cannot load {module_path}: {exc}")
        return report
    report.add("module", "ok", f"{module_path}: {lib.manufacturer_id.strip()} "
                               f"{lib.library_description.strip()} {'.'.join(map(str, lib.library_version))}, "
                               f"Cryptoki {'.'.join(map(str, lib.cryptoki_version))}")
    try:
        slots = lib.get_slots(token_present=True)
        tokens = [(slot, slot.get_token()) for slot in slots]
    except pkcs11.exceptions.PKCS11Error as exc:
        report.add("slots", "problem", f"cannot list slots: {type(exc).__name__}")
        return report
    listing = ", ".join(f"{slot.slot_id:#x}: {token.label!r}" for slot, token in tokens) or "none"
    report.add("slots", "ok" if tokens else "problem", f"{len(tokens)} slot(s) with a token: {listing}")
    matching = [(slot, token) for slot, token in tokens if token.label == token_label]
    if len(matching) != 1:
        report.add("token", "problem", f"token {token_label!r}: found {len(matching)} times (need exactly one)")
        return report
    slot, token = matching[0]
    raised = [name for name in PIN_FLAGS if token.flags & getattr(pkcs11.TokenFlag, name)]
    if not token.flags & pkcs11.TokenFlag.TOKEN_INITIALIZED or not token.flags & pkcs11.TokenFlag.USER_PIN_INITIALIZED:
        report.add("token", "problem", f"token {token_label!r} is not initialised or has no user PIN")
    else:
        report.add("token", "problem" if "USER_PIN_LOCKED" in raised or "USER_PIN_FINAL_TRY" in raised
                   else "warning" if raised else "ok",
                   f"{token_label!r} in slot {slot.slot_id:#x}: {token.manufacturer_id.strip()} "
                   f"{token.model.strip()}" + (f"; flags {', '.join(raised)}" if raised else ""))
    _check_mechanisms(pkcs11, slot, profile, report)
    if pin is None:
        report.add("login", "skipped", "no PIN given (--no-login): key attributes not checked")
        return report
    try:
        with _opening_alone(worker_config(profile, PoolSettings(module_path, token_label, pin))):
            session = token.open(user_pin=pin)
    except pkcs11.exceptions.PKCS11Error as exc:
        report.add("login", "problem", f"login refused: {type(exc).__name__}")
        return report
    report.add("login", "ok", "user login works")
    try:
        _check_keys(pkcs11, session, profile, report)
    finally:
        session.close()
    return report


def _check_mechanisms(pkcs11: Any, slot: Any, profile: HsmProfile, report: DoctorReport) -> None:
    available = {int(mechanism) for mechanism in slot.get_mechanisms()}

    def flags(mechanism: int) -> int:
        try:
            return int(slot.get_mechanism_info(mechanism).flags)
        except pkcs11.exceptions.PKCS11Error:
            return 0

    for algorithm, section in profile.algorithms.items():
        wanted = [(section.sign_mechanism_value, pkcs11.MechanismFlag.SIGN, "sign")]
        generation = KEY_PAIR_GEN.get(section.key_type_value)
        if generation is not None:
            wanted.append((generation, pkcs11.MechanismFlag.GENERATE_KEY_PAIR, "generate key pair"))
        missing = [f"{_name(m)} ({what})" for m, flag, what in wanted
                   if m not in available or not flags(m) & int(flag)]
        present = ", ".join(f"{_name(m)} {what}" for m, _, what in wanted)
        if missing:
            report.add(f"mechanisms {algorithm}", "problem", f"missing or without the flag: {', '.join(missing)}")
        elif generation is None:
            report.add(f"mechanisms {algorithm}", "warning",
                       f"{present}; vendor key type {section.key_type}: its generation mechanism is not checked")
        else:
            report.add(f"mechanisms {algorithm}", "ok", present)


def _check_keys(pkcs11: Any, session: Any, profile: HsmProfile, report: DoctorReport) -> None:
    wanted = {**{name.lower(): value for name, value in profile.key_templates.private.items()}, **ALWAYS_REQUIRED}
    keys = list(session.get_objects({pkcs11.Attribute.CLASS: pkcs11.ObjectClass.PRIVATE_KEY}))
    if not keys:
        report.add("keys", "warning", "no private key on the token yet")
        return
    for key in keys:
        name = f"{key[pkcs11.Attribute.LABEL]!r} id {bytes(key[pkcs11.Attribute.ID]).hex()}"
        wrong = []
        for attribute, value in sorted(wanted.items()):
            try:
                actual = bool(key[getattr(pkcs11.Attribute, attribute.upper())])
            except (pkcs11.exceptions.PKCS11Error, AttributeError):
                wrong.append(f"{attribute} unreadable")
                continue
            if actual is not value:
                wrong.append(f"{attribute} = {str(actual).lower()} (profile: {str(value).lower()})")
        if wrong:
            report.add(f"key {name}", "problem", "; ".join(wrong))
        else:
            report.add(f"key {name}", "ok", ", ".join(f"{a} = {str(v).lower()}" for a, v in sorted(wanted.items())))
