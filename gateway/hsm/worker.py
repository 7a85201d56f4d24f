"""The signer worker: a spawned process that owns one PKCS#11 session.

python-pkcs11 initialises the module without locking flags, so a directly loaded SoftHSM2 does no
locking: two threads in one process calling it at once crash the process. Each worker therefore
calls PKCS#11 from its main thread only, and the gateway scales by starting several workers
(spawned, never forked after the library is loaded). A worker keeps its logged-in session and a
cache of key handles for its whole life; a per-request session and login would cost ~20×.

This module runs inside the worker and imports nothing of the gateway's HTTP or store layers.

Wire format (``multiprocessing.Connection`` pickles): the parent sends a list of jobs, the worker
answers with a list of results in the same order. A job is a tuple whose first item names it:

- ``("sign", key_id, algorithm, [data, ...])`` → list of signatures (raw r‖s or Ed25519 bytes)
- ``("generate", key_id, label, algorithm)`` → public key bytes (EC point / Ed25519 key)
- ``("public_key", key_id, algorithm)`` → public key bytes
- ``("attributes", key_id)`` → dict of the private key's protection attributes
- ``("describe", id_hex, label)`` → what adoption checks of one existing private key (found by
  CKA_ID and/or CKA_LABEL): id, label, key type, curve, protection attributes, public key, the
  token's mechanisms and identity (see :meth:`Worker.describe`)
- ``("ping",)`` → ``True`` once the session works (recovering it if needed)

A result is ``(True, value)`` or ``(False, kind, message)`` with ``kind`` one of
``unavailable`` (retry later), ``not_found``, ``ambiguous``, ``login`` (wrong PIN: never retried),
``error`` (the HSM refused: bad mechanism, bad data).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

#: Exceptions after which the session or module must be rebuilt. Names, because pkcs11 is
#: imported only inside the worker process.
RECOVERABLE = frozenset(
    {
        "SessionHandleInvalid",
        "SessionClosed",
        "DeviceError",
        "DeviceRemoved",
        "DeviceMemory",
        "TokenNotPresent",
        "TokenNotRecognised",
        "ObjectHandleInvalid",
        "KeyHandleInvalid",
        "GeneralError",
        "UserNotLoggedIn",
        "NoSuchToken",
        "SlotIDInvalid",
        "FunctionFailed",
        "CryptokiNotInitialized",
        "PKCS11Error",
    }
)
#: Longest wait for another process's turn at opening the token (see :func:`_opening_alone`).
OPEN_LOCK_WAIT_S = 5.0
#: Never retried: a retry with a wrong PIN could lock the token.
LOGIN_ERRORS = frozenset({"PinIncorrect", "PinInvalid", "PinLenRange", "PinLocked", "PinExpired"})


@dataclass(frozen=True)
class AlgorithmSpec:
    """What the worker needs to know of one algorithm (from the profile)."""

    key_type: int
    curve_oid: str
    mechanism: int
    der_signatures: bool


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a worker needs; sent through the spawn pipe, never on a command line."""

    module_path: str
    token_label: str
    pin: str = field(repr=False)
    algorithms: dict[str, AlgorithmSpec]
    private_template: dict[str, bool]
    public_template: dict[str, bool]
    min_recovery_interval: float = 0.25
    max_recovery_interval: float = 2.0
    token_attributes: dict[str, str] = field(default_factory=dict)
    """Besides the label, what the token must match (a profile's ``token.uri``: serial, manufacturer,
    model, slot-id, slot-description, slot-manufacturer, library-*); empty: the label alone."""


class _Failure(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class Worker:
    """One PKCS#11 session and its key-handle cache, driven from a single thread."""

    def __init__(self, config: WorkerConfig) -> None:
        import pkcs11  # only in the worker process: the HTTP process never loads the PKCS#11 library

        self._pkcs11 = pkcs11
        self.config = config
        self.lib: Any = None
        self.session: Any = None
        self.keys: dict[str, Any] = {}
        self.next_recovery = 0.0
        self.recovery_interval = config.min_recovery_interval

    # --- session life -----------------------------------------------------------------------

    def open(self) -> None:
        """Load the module, find the token by label and log in.

        Raises:
            _Failure: ``login`` for a rejected PIN, ``unavailable`` when the token cannot be reached.
        """
        pkcs11 = self._pkcs11
        try:
            with _opening_alone(self.config):
                if self.lib is None:
                    self.lib = pkcs11.lib(self.config.module_path)
                else:
                    self.lib.reinitialize()
                token = self._find_token()
                self.session = token.open(user_pin=self.config.pin, rw=True)
        except pkcs11.exceptions.PKCS11Error as exc:
            self.session = None
            raise self._classify(exc) from None
        except RuntimeError as exc:  # module cannot be loaded
            raise _Failure("unavailable", f"cannot load PKCS#11 module: {exc}") from None
        self.keys.clear()
        self.recovery_interval = self.config.min_recovery_interval

    def _find_token(self) -> Any:
        """The one token with the configured label whose identity matches every configured attribute."""
        label = self.config.token_label or None
        if not self.config.token_attributes:
            return self.lib.get_token(token_label=label)
        matches = [token for token in self.lib.get_tokens(token_label=label)
                   if _token_matches(self.lib, token, self.config.token_attributes)]
        if not matches:
            raise self._pkcs11.exceptions.NoSuchToken(f"no token matches {self.config.token_attributes}")
        if len(matches) > 1:
            raise _Failure("error", f"{len(matches)} tokens match {self.config.token_attributes}; add serial= "
                                    "to the profile's token.uri")
        return matches[0]

    def recover(self) -> None:
        """Drop the session and module state and open again, at a bounded rate."""
        now = time.monotonic()
        if now < self.next_recovery:
            raise _Failure("unavailable", "HSM unavailable; recovery is under way")
        self.next_recovery = now + self.recovery_interval
        self.recovery_interval = min(self.recovery_interval * 2, self.config.max_recovery_interval)
        self.keys.clear()
        if self.session is not None:
            try:
                self.session.close()
            except Exception:
                pass
            self.session = None
        self.open()

    def _classify(self, exc: BaseException) -> _Failure:
        name = type(exc).__name__
        if name in LOGIN_ERRORS:
            return _Failure("login", f"token rejected the PIN ({name})")
        if name == "UserAlreadyLoggedIn":
            return _Failure("unavailable", name)
        if name in RECOVERABLE:
            return _Failure("unavailable", f"HSM unavailable ({name})")
        return _Failure("error", f"HSM refused the operation ({name}: {exc})")

    def _with_recovery(self, operation: Any, retry: bool) -> Any:
        """Run ``operation``; after a recoverable error rebuild the session and (if ``retry``) run once more.

        A key the gateway knows but the token does not show counts as recoverable too: that is
        how a token that went away (or came back from a backup) looks from inside a session.
        """
        if self.session is None:
            self.recover()
        try:
            return operation()
        except (self._pkcs11.exceptions.PKCS11Error, _Failure) as exc:
            failure = exc if isinstance(exc, _Failure) else self._classify(exc)
            if failure.kind not in ("unavailable", "missing"):
                raise failure from None
        self.next_recovery = 0.0  # the first attempt after a failure is immediate
        try:
            self.recover()
        except _Failure as again:
            raise _Failure("unavailable", str(again) if failure.kind == "missing" else str(failure)) from None
        if not retry:
            raise _Failure("unavailable", str(failure))
        try:
            return operation()
        except (self._pkcs11.exceptions.PKCS11Error, _Failure) as exc:
            final = exc if isinstance(exc, _Failure) else self._classify(exc)
            if final.kind in ("unavailable", "missing"):
                self.session = None if final.kind == "unavailable" else self.session
                raise _Failure("unavailable", str(final)) from None
            raise final from None

    # --- key handles ------------------------------------------------------------------------

    def _private_key(self, key_id: str) -> Any:
        cached = self.keys.get(key_id)
        if cached is not None:
            return cached
        pkcs11 = self._pkcs11
        found = list(
            self.session.get_objects(
                {
                    pkcs11.Attribute.CLASS: pkcs11.ObjectClass.PRIVATE_KEY,
                    pkcs11.Attribute.ID: bytes.fromhex(key_id),
                }
            )
        )
        if not found:
            raise _Failure("missing", f"the token shows no private key with id {key_id}")
        if len(found) > 1:
            raise _Failure("ambiguous", f"{len(found)} private keys have id {key_id}; refusing to guess")
        self.keys[key_id] = found[0]
        return found[0]

    def _public_point(self, key_id: str) -> bytes:
        pkcs11 = self._pkcs11
        found = list(
            self.session.get_objects(
                {
                    pkcs11.Attribute.CLASS: pkcs11.ObjectClass.PUBLIC_KEY,
                    pkcs11.Attribute.ID: bytes.fromhex(key_id),
                }
            )
        )
        if len(found) != 1:
            raise _Failure("not_found" if not found else "ambiguous", f"public key {key_id}: {len(found)} objects")
        return _unwrap_octet_string(bytes(found[0][pkcs11.Attribute.EC_POINT]))

    # --- operations -------------------------------------------------------------------------

    def sign(self, key_id: str, algorithm: str, items: list[bytes]) -> list[bytes]:
        spec = self._spec(algorithm)
        mechanism = self._mechanism(spec.mechanism)

        def run() -> list[bytes]:
            key = self._private_key(key_id)
            signatures = [key.sign(item, mechanism=mechanism) for item in items]
            if spec.der_signatures:
                from pkcs11.util.ec import decode_ecdsa_signature  # worker process only (see __init__)

                return [decode_ecdsa_signature(sig) for sig in signatures]
            return [bytes(sig) for sig in signatures]

        result: list[bytes] = self._with_recovery(run, retry=True)
        return result

    def generate(self, key_id: str, label: str, algorithm: str) -> bytes:
        pkcs11 = self._pkcs11
        from pkcs11.util.ec import encode_named_curve_parameters  # worker process only (see __init__)

        spec = self._spec(algorithm)

        def run() -> bytes:
            existing = list(self.session.get_objects({pkcs11.Attribute.ID: bytes.fromhex(key_id)}))
            if existing:
                raise _Failure("ambiguous", f"objects with id {key_id} exist already")
            params = self.session.create_domain_parameters(
                pkcs11.KeyType(spec.key_type) if spec.key_type < 0x80000000 else spec.key_type,
                {pkcs11.Attribute.EC_PARAMS: encode_named_curve_parameters(spec.curve_oid)},
                local=True,
            )
            public, _private = params.generate_keypair(
                store=True,
                label=label,
                id=bytes.fromhex(key_id),
                public_template=_template(pkcs11, self.config.public_template),
                private_template=_template(pkcs11, self.config.private_template),
            )
            return _unwrap_octet_string(bytes(public[pkcs11.Attribute.EC_POINT]))

        result: bytes = self._with_recovery(run, retry=False)
        return result

    def public_key(self, key_id: str) -> bytes:
        result: bytes = self._with_recovery(lambda: self._public_point(key_id), retry=True)
        return result

    def attributes(self, key_id: str) -> dict[str, bool]:
        pkcs11 = self._pkcs11
        names = ("SENSITIVE", "EXTRACTABLE", "ALWAYS_SENSITIVE", "NEVER_EXTRACTABLE", "TOKEN", "PRIVATE")

        def run() -> dict[str, bool]:
            key = self._private_key(key_id)
            return {name.lower(): bool(key[getattr(pkcs11.Attribute, name)]) for name in names}

        result: dict[str, bool] = self._with_recovery(run, retry=True)
        return result

    def describe(self, id_hex: str | None, label: str | None) -> dict[str, Any]:
        """What adopting an existing key checks, as the token reports it: the one private key with CKA_ID
        ``id_hex`` and/or CKA_LABEL ``label`` (``not_found`` for none, ``ambiguous`` for several).

        Nothing is decided here (the gateway decides in ``gateway.key_lifecycle``); nothing is changed.
        """
        pkcs11 = self._pkcs11
        Attribute = pkcs11.Attribute

        def run() -> dict[str, Any]:
            template: dict[Any, Any] = {Attribute.CLASS: pkcs11.ObjectClass.PRIVATE_KEY}
            if id_hex is not None:
                template[Attribute.ID] = bytes.fromhex(id_hex)
            if label is not None:
                template[Attribute.LABEL] = label
            found = list(self.session.get_objects(template))
            if not found:
                raise _Failure("not_found", "the token has no private key matching the URI")
            if len(found) > 1:
                raise _Failure("ambiguous", f"{len(found)} private keys match the URI; add id= or object=")
            key = found[0]
            key_id = bytes(key[Attribute.ID])
            facts: dict[str, Any] = {
                "id": key_id.hex(), "label": str(key[Attribute.LABEL]), "key_type": int(key[Attribute.KEY_TYPE]),
            }
            for name in ("SENSITIVE", "EXTRACTABLE", "PRIVATE", "SIGN", "ALWAYS_SENSITIVE", "NEVER_EXTRACTABLE",
                         "TOKEN"):
                facts[name.lower()] = _bool_attribute(key, getattr(Attribute, name))
            params = _attribute(key, Attribute.EC_PARAMS)
            facts["curve_oid"] = _oid_text(bytes(params)) if params is not None else None
            publics = list(self.session.get_objects({Attribute.CLASS: pkcs11.ObjectClass.PUBLIC_KEY,
                                                     Attribute.ID: key_id}))
            facts["public_key"] = (_unwrap_octet_string(bytes(publics[0][Attribute.EC_POINT]))
                                   if len(publics) == 1 else None)
            slot = self.session.token.slot
            facts["mechanisms"] = sorted(int(m) for m in slot.get_mechanisms())
            facts["token"] = _token_identity(self.lib, self.session.token)
            return facts

        result: dict[str, Any] = self._with_recovery(run, retry=True)
        return result

    def ping(self) -> bool:
        """Prove the session works: touches the token, so a vanished token or device shows up."""
        pkcs11 = self._pkcs11

        def run() -> bool:
            self.session.generate_random(64)
            # A find over the private keys reaches the token's object store, not just the RNG.
            next(iter(self.session.get_objects({pkcs11.Attribute.CLASS: pkcs11.ObjectClass.SECRET_KEY})), None)
            return True

        result: bool = self._with_recovery(run, retry=True)
        return result

    def _spec(self, algorithm: str) -> AlgorithmSpec:
        try:
            return self.config.algorithms[algorithm]
        except KeyError:
            raise _Failure("error", f"the HSM profile does not support {algorithm}") from None

    def _mechanism(self, value: int) -> Any:
        try:
            return self._pkcs11.Mechanism(value)
        except ValueError:  # vendor-defined mechanism: python-pkcs11 passes the number through
            return value

    # --- dispatch ---------------------------------------------------------------------------

    def handle(self, job: tuple[Any, ...]) -> tuple[Any, ...]:
        try:
            match job:
                case ("sign", key_id, algorithm, items):
                    return (True, self.sign(key_id, algorithm, items))
                case ("generate", key_id, label, algorithm):
                    return (True, self.generate(key_id, label, algorithm))
                case ("public_key", key_id, _algorithm):
                    return (True, self.public_key(key_id))
                case ("attributes", key_id):
                    return (True, self.attributes(key_id))
                case ("describe", id_hex, label):
                    return (True, self.describe(id_hex, label))
                case ("ping",):
                    return (True, self.ping())
                case _:
                    return (False, "error", f"unknown job {job[0]!r}")
        except _Failure as failure:
            return (False, failure.kind, str(failure))
        except Exception as exc:  # a worker must answer every job, whatever breaks
            return (False, "error", f"{type(exc).__name__}: {exc}")


@contextlib.contextmanager
def _opening_alone(config: WorkerConfig) -> Iterator[None]:
    """Hold an exclusive ``flock`` shared by every process on this machine that opens the same
    token (the workers of one pool, of several HTTP processes, of other instances) while this one
    initialises the module and logs in.

    SoftHSM2 rewrites its token files on login; another process reading them at that moment finds
    no token (``NoSuchToken``) or fails (``GeneralError``), and its worker started out down. It was
    seen in about one start in ten on a fresh token. Opening takes milliseconds and happens at start
    and on recovery only, so taking turns costs nothing.

    The lock lives in the shared temp dir, so it must never be able to stop a worker: a link planted
    there is not followed, and a lock held for longer than :data:`OPEN_LOCK_WAIT_S` (or a file that
    cannot be opened) means opening without it — as before the lock existed.
    """
    name = hashlib.sha256(f"{config.module_path}\0{config.token_label}".encode()).hexdigest()[:16]
    path = os.path.join(tempfile.gettempdir(), f"ecny-pkcs11-open-{name}.lock")
    try:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError:
        yield
        return
    try:
        deadline = time.monotonic() + OPEN_LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.01)
        yield
    finally:
        os.close(descriptor)  # releases the lock if held


def _token_identity(lib: Any, token: Any) -> dict[str, str]:
    """A token's identity under the names of RFC 7512's path attributes."""
    serial = token.serial.decode(errors="replace") if isinstance(token.serial, bytes) else str(token.serial)
    version = lib.library_version
    return {
        "token": str(token.label).rstrip(), "manufacturer": str(token.manufacturer_id).rstrip(),
        "serial": serial.rstrip(), "model": str(token.model).rstrip(), "slot-id": str(token.slot.slot_id),
        "slot-description": str(token.slot.slot_description).rstrip(),
        "slot-manufacturer": str(token.slot.manufacturer_id).rstrip(),
        "library-manufacturer": str(lib.manufacturer_id).rstrip(),
        "library-description": str(lib.library_description).rstrip(),
        "library-version": f"{version[0]}.{version[1]}" if isinstance(version, tuple) else str(version),
    }


def _token_matches(lib: Any, token: Any, wanted: dict[str, str]) -> bool:
    identity = _token_identity(lib, token)
    for name, value in wanted.items():
        have = identity.get(name)
        if name == "library-version" and have is not None and "." not in value:
            have = have.split(".")[0]  # "library-version=3" matches 3.x (RFC 7512 §2.3)
        if have != value:
            return False
    return True


def _attribute(key: Any, attribute: Any) -> Any:
    """An attribute's value, or None where the token does not have it for this object."""
    try:
        return key[attribute]
    except (KeyError, NotImplementedError):
        return None
    except Exception as exc:  # AttributeTypeInvalid, AttributeSensitive: absent for our purpose
        if type(exc).__name__ in ("AttributeTypeInvalid", "AttributeSensitive"):
            return None
        raise


def _bool_attribute(key: Any, attribute: Any) -> bool | None:
    value = _attribute(key, attribute)
    return None if value is None else bool(value)


def _oid_text(der: bytes) -> str | None:
    """The dotted OID of a DER OBJECT IDENTIFIER (CKA_EC_PARAMS of a named curve); None for anything else."""
    if len(der) < 3 or der[0] != 0x06 or der[1] != len(der) - 2:
        return None
    body = der[2:]
    arcs = [min(body[0] // 40, 2), body[0] - 40 * min(body[0] // 40, 2)]
    value = 0
    for byte in body[1:]:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            arcs.append(value)
            value = 0
    return ".".join(str(arc) for arc in arcs)


def _template(pkcs11: Any, attributes: dict[str, bool]) -> dict[Any, bool]:
    return {getattr(pkcs11.Attribute, name.upper()): value for name, value in attributes.items()}


def _unwrap_octet_string(point: bytes) -> bytes:
    """CKA_EC_POINT is usually DER OCTET STRING-wrapped (SoftHSM does); return the bare point."""
    if len(point) >= 2 and point[0] == 0x04:
        length = point[1]
        # A bare uncompressed point starts with 0x04 too; only a length byte that covers the
        # rest exactly *and* is the size of a real point (Ed25519 32, compressed 33, P-256 65)
        # marks the DER wrapping.
        if length == len(point) - 2 and length in (32, 33, 65):
            return point[2:]
        if length == 0x81 and len(point) > 3 and point[2] == len(point) - 3:
            return point[3:]
    return point


def worker_main(conn: Connection, config: WorkerConfig) -> None:
    """Entry point of a spawned worker: log in, say ready, then answer batches until EOF."""
    try:
        worker = Worker(config)
    except Exception as exc:
        conn.send(("fatal", "unavailable", f"cannot start the PKCS#11 worker: {exc}"))
        return
    try:
        worker.open()
        conn.send(("ready", None, ""))
    except _Failure as failure:
        if failure.kind == "login":
            conn.send(("fatal", failure.kind, str(failure)))
            return
        # The HSM is down at start: serve anyway and recover when it returns.
        conn.send(("ready", failure.kind, str(failure)))
    while True:
        try:
            jobs = conn.recv()
        except (EOFError, OSError):
            return
        results = [worker.handle(job) for job in jobs]
        try:
            conn.send(results)
        except (BrokenPipeError, OSError):
            return
