"""PKCS#11 URIs (RFC 7512): parse ``pkcs11:`` URIs into their path and query attributes.

Pure: no PKCS#11 library, no I/O. The HSM profile names its token by URI (``token.uri``) and
``ecny-gateway keys adopt --uri`` names an existing key by one; both parse here.

What the RFC says and how it is applied:

- path attributes (``;``-separated, each at most once): ``token``, ``manufacturer``, ``serial``,
  ``model``, ``library-manufacturer``, ``library-description``, ``library-version``, ``object``,
  ``type``, ``id``, ``slot-manufacturer``, ``slot-description``, ``slot-id``;
- query attributes (``&``-separated): ``pin-source``, ``pin-value``, ``module-name``, ``module-path``;
- values are percent-decoded; ``id`` is raw bytes, every other value UTF-8 text;
- an attribute this parser does not know (a vendor-specific one, or one of a later revision) is kept:
  in the path it makes the URI match nothing (:attr:`Pkcs11Uri.unknown_path`, §2.4: a consumer that
  cannot honour a path attribute must not match more than the URI names), in the query it is ignored;
- ``pin-source`` together with ``pin-value`` is refused (§2.3). Callers refuse ``pin-value`` where the
  URI comes from a config file or a command line (:meth:`Pkcs11Uri.refuse_pin_value`): a PIN there is
  a secret in a file or in ``argv``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from string import ascii_letters, digits

SCHEME = "pkcs11:"

#: Path attributes of RFC 7512 §2.3 (in the RFC's order).
PATH_ATTRIBUTES = (
    "token", "manufacturer", "serial", "model", "library-manufacturer", "library-description",
    "library-version", "object", "type", "id", "slot-manufacturer", "slot-description", "slot-id",
)
#: Query attributes of RFC 7512 §2.3.
QUERY_ATTRIBUTES = ("pin-source", "pin-value", "module-name", "module-path")
#: Values of the ``type`` attribute (CKO_PUBLIC_KEY, CKO_PRIVATE_KEY, CKO_CERTIFICATE, CKO_SECRET_KEY, CKO_DATA).
OBJECT_TYPES = ("public", "private", "cert", "secret-key", "data")
#: Path attributes that say which token (and slot, and library) a URI is about, not which object.
TOKEN_ATTRIBUTES = ("token", "manufacturer", "serial", "model", "slot-manufacturer", "slot-description", "slot-id",
                    "library-manufacturer", "library-description", "library-version")

_UNRESERVED = ascii_letters + digits + "-._~"
#: Characters allowed unencoded in a path attribute value (pk11-pchar): unreserved, ":[]@!$'()*+,=&".
_PATH_CHARS = frozenset(_UNRESERVED + ":[]@!$'()*+,=&")
#: Characters allowed unencoded in a query attribute value (pk11-qchar): unreserved, ":[]@!$'()*+,=/?|".
_QUERY_CHARS = frozenset(_UNRESERVED + ":[]@!$'()*+,=/?|")
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
_LIBRARY_VERSION = re.compile(r"^[0-9]+(\.[0-9]+)?$")


class Pkcs11UriError(ValueError):
    """Not a PKCS#11 URI this parser accepts; the message says what is wrong and where."""


@dataclass(frozen=True)
class Pkcs11Uri:
    """A parsed PKCS#11 URI. Text attributes decoded to ``str``; ``id`` to ``bytes``."""

    path: dict[str, str] = field(default_factory=dict)
    """Known path attributes except ``id``, percent-decoded."""
    object_id: bytes | None = None
    """The ``id`` attribute (CKA_ID), percent-decoded bytes."""
    query: dict[str, str] = field(default_factory=dict)
    """Known query attributes, percent-decoded."""
    unknown_path: dict[str, str] = field(default_factory=dict)
    """Path attributes this parser does not know (vendor-specific or newer): the URI matches nothing."""
    unknown_query: dict[str, str] = field(default_factory=dict)
    """Query attributes this parser does not know: ignored."""

    @property
    def token(self) -> str | None:
        return self.path.get("token")

    @property
    def object_label(self) -> str | None:
        return self.path.get("object")

    @property
    def object_type(self) -> str | None:
        return self.path.get("type")

    @property
    def slot_id(self) -> int | None:
        value = self.path.get("slot-id")
        return None if value is None else int(value)

    @property
    def pin_source(self) -> str | None:
        return self.query.get("pin-source")

    @property
    def module_path(self) -> str | None:
        return self.query.get("module-path")

    @property
    def module_name(self) -> str | None:
        return self.query.get("module-name")

    def token_attributes(self) -> dict[str, str]:
        """The path attributes that select a token, slot or library (``token``, ``serial``, …)."""
        return {name: value for name, value in self.path.items() if name in TOKEN_ATTRIBUTES}

    def names_an_object(self) -> bool:
        """True if the URI has ``object``, ``type`` or ``id``: it names objects, not just a token."""
        return self.object_id is not None or "object" in self.path or "type" in self.path

    def refuse_pin_value(self, where: str) -> None:
        """Raise Pkcs11UriError if the URI carries ``pin-value``: a PIN written into ``where`` (a config
        file, a command line) is a secret where secrets must not be."""
        if "pin-value" in self.query:
            raise Pkcs11UriError(
                f"{where}: the URI carries pin-value, which puts the PIN in clear text; "
                "give the PIN as hsm.pin_file or ECNY_HSM__PIN instead"
            )

    def refuse_unknown_path(self, where: str) -> None:
        """Raise Pkcs11UriError for an unknown path attribute: the URI would match nothing (RFC 7512 §2.4)."""
        if self.unknown_path:
            raise Pkcs11UriError(
                f"{where}: unknown path attribute(s) {sorted(self.unknown_path)}; a PKCS#11 URI with a path "
                "attribute the consumer does not understand matches nothing (RFC 7512 §2.4)"
            )


def _decode(value: str, allowed: frozenset[str], name: str) -> bytes:
    """Percent-decode ``value``; every other character must be one the grammar allows unencoded."""
    out = bytearray()
    index = 0
    while index < len(value):
        char = value[index]
        if char == "%":
            pair = value[index + 1 : index + 3]
            if len(pair) != 2 or any(c not in "0123456789abcdefABCDEF" for c in pair):
                raise Pkcs11UriError(f"attribute {name!r}: bad percent-encoding at {value[index:index + 3]!r}")
            out.append(int(pair, 16))
            index += 3
            continue
        if char not in allowed:
            raise Pkcs11UriError(f"attribute {name!r}: character {char!r} must be percent-encoded")
        out += char.encode("ascii")
        index += 1
    return bytes(out)


def _text(raw: bytes, name: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise Pkcs11UriError(f"attribute {name!r}: not UTF-8 text once percent-decoded") from None


def _pairs(component: str, separator: str, where: str) -> list[tuple[str, str]]:
    pairs = []
    for part in component.split(separator):
        if not part:
            continue  # "pkcs11:" and a trailing separator name nothing
        name, equals, value = part.partition("=")
        if not equals:
            raise Pkcs11UriError(f"{where} attribute {part!r}: expected name=value")
        if not _NAME.match(name):
            raise Pkcs11UriError(f"{where} attribute name {name!r}: letters, digits, '-' and '_' only")
        pairs.append((name, value))
    return pairs


def _check_path_value(name: str, value: str) -> None:
    if name == "type" and value not in OBJECT_TYPES:
        raise Pkcs11UriError(f"attribute 'type': {value!r} is not one of {list(OBJECT_TYPES)}")
    if name == "slot-id" and not value.isdigit():
        raise Pkcs11UriError(f"attribute 'slot-id': {value!r} is not a decimal number")
    if name == "library-version" and not _LIBRARY_VERSION.match(value):
        raise Pkcs11UriError(f"attribute 'library-version': {value!r} is not M or M.N")


def parse(text: str) -> Pkcs11Uri:
    """Parse a PKCS#11 URI.

    Raises:
        Pkcs11UriError: not ``pkcs11:``, malformed attribute, bad percent-encoding, a path attribute given
            twice, a bad ``type``/``slot-id``/``library-version``, or ``pin-source`` with ``pin-value``.
    """
    if text[: len(SCHEME)].lower() != SCHEME:
        raise Pkcs11UriError(f"not a PKCS#11 URI (must start with {SCHEME!r})")
    rest = text[len(SCHEME):]
    path_part, _, query_part = rest.partition("?")
    path: dict[str, str] = {}
    unknown_path: dict[str, str] = {}
    object_id: bytes | None = None
    seen: set[str] = set()
    for name, value in _pairs(path_part, ";", "path"):
        if name in seen:
            raise Pkcs11UriError(f"path attribute {name!r} appears twice (RFC 7512: at most once)")
        seen.add(name)
        raw = _decode(value, _PATH_CHARS, name)
        if name == "id":
            object_id = raw
        elif name in PATH_ATTRIBUTES:
            decoded = _text(raw, name)
            _check_path_value(name, decoded)
            path[name] = decoded
        else:
            unknown_path[name] = _text(raw, name)
    query: dict[str, str] = {}
    unknown_query: dict[str, str] = {}
    for name, value in _pairs(query_part, "&", "query"):
        decoded = _text(_decode(value, _QUERY_CHARS, name), name)
        target = query if name in QUERY_ATTRIBUTES else unknown_query
        if name in target:
            raise Pkcs11UriError(f"query attribute {name!r} appears twice")
        target[name] = decoded
    if "pin-source" in query and "pin-value" in query:
        raise Pkcs11UriError("the URI has both pin-source and pin-value; RFC 7512 says to refuse it")
    return Pkcs11Uri(path, object_id, query, unknown_path, unknown_query)


def _encode(raw: bytes, allowed: frozenset[str]) -> str:
    return "".join(chr(b) if chr(b) in allowed and b < 0x80 else f"%{b:02X}" for b in raw)


def format_uri(uri: Pkcs11Uri) -> str:
    """The URI as text: path attributes in the RFC's order, ``id`` fully percent-encoded (§2.3 asks for
    that), query attributes after ``?``. Unknown attributes are written back as they were."""
    parts = []
    for name in PATH_ATTRIBUTES:
        if name == "id":
            if uri.object_id is not None:
                parts.append("id=" + "".join(f"%{b:02X}" for b in uri.object_id))
        elif name in uri.path:
            parts.append(f"{name}={_encode(uri.path[name].encode(), _PATH_CHARS - {'&'})}")
    parts += [f"{name}={_encode(value.encode(), _PATH_CHARS - {'&'})}" for name, value in uri.unknown_path.items()]
    text = SCHEME + ";".join(parts)
    query = {**uri.query, **uri.unknown_query}
    if query:
        text += "?" + "&".join(f"{name}={_encode(value.encode(), _QUERY_CHARS)}" for name, value in query.items())
    return text
