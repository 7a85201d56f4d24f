"""PKCS#11 URIs (RFC 7512): the RFC's own examples (section 3) as test vectors, then the refusals.

Pure logic: no token. The examples are copied from the RFC; each row gives what it must parse to.
"""

from __future__ import annotations

from typing import Any

import pytest

from gateway.errors import ConfigError
from gateway.hsm.profile import TokenSection
from gateway.hsm.uri import Pkcs11Uri, Pkcs11UriError, format_uri, parse

#: RFC 7512 section 3, in its order: (URI, path attributes, id, query attributes, unknown path, unknown query).
RFC_EXAMPLES: list[tuple[str, dict[str, str], bytes | None, dict[str, str], dict[str, str], dict[str, str]]] = [
    ("pkcs11:", {}, None, {}, {}, {}),
    ("pkcs11:object=my-pubkey;type=public", {"object": "my-pubkey", "type": "public"}, None, {}, {}, {}),
    ("pkcs11:object=my-key;type=private?pin-source=file:/etc/token",
     {"object": "my-key", "type": "private"}, None, {"pin-source": "file:/etc/token"}, {}, {}),
    ("pkcs11:token=The%20Software%20PKCS%2311%20Softtoken;manufacturer=Snake%20Oil,%20Inc.;model=1.0;"
     "object=my-certificate;type=cert;id=%69%95%3E%5C%F4%BD%EC%91;serial=?pin-source=file:/etc/token_pin",
     {"token": "The Software PKCS#11 Softtoken", "manufacturer": "Snake Oil, Inc.", "model": "1.0",
      "object": "my-certificate", "type": "cert", "serial": ""},
     bytes([0x69, 0x95, 0x3E, 0x5C, 0xF4, 0xBD, 0xEC, 0x91]), {"pin-source": "file:/etc/token_pin"}, {}, {}),
    ("pkcs11:object=my-sign-key;type=private?module-name=mypkcs11",
     {"object": "my-sign-key", "type": "private"}, None, {"module-name": "mypkcs11"}, {}, {}),
    ("pkcs11:object=my-sign-key;type=private?module-path=/mnt/libmypkcs11.so.1",
     {"object": "my-sign-key", "type": "private"}, None, {"module-path": "/mnt/libmypkcs11.so.1"}, {}, {}),
    ("pkcs11:token=Software%20PKCS%2311%20softtoken;manufacturer=Snake%20Oil,%20Inc.?pin-value=the-pin",
     {"token": "Software PKCS#11 softtoken", "manufacturer": "Snake Oil, Inc."}, None, {"pin-value": "the-pin"}, {},
     {}),
    ("pkcs11:slot-description=Sun%20Metaslot", {"slot-description": "Sun Metaslot"}, None, {}, {}, {}),
    ("pkcs11:library-manufacturer=Snake%20Oil,%20Inc.;library-description=Soft%20Token%20Library;"
     "library-version=1.23",
     {"library-manufacturer": "Snake Oil, Inc.", "library-description": "Soft Token Library",
      "library-version": "1.23"}, None, {}, {}, {}),
    ("pkcs11:token=My%20token%25%20created%20by%20Joe;library-version=3;id=%01%02%03%Ba%dd%Ca%fe%04%05%06",
     {"token": "My token% created by Joe", "library-version": "3"},
     bytes([0x01, 0x02, 0x03, 0xBA, 0xDD, 0xCA, 0xFE, 0x04, 0x05, 0x06]), {}, {}, {}),
    ("pkcs11:token=A%20name%20with%20a%20substring%20%25%3B;object=my-certificate;type=cert",
     {"token": "A name with a substring %;", "object": "my-certificate", "type": "cert"}, None, {}, {}, {}),
    ("pkcs11:token=Name%20with%20a%20small%20A%20with%20acute:%20%C3%A1;object=my-certificate;type=cert",
     {"token": "Name with a small A with acute: \u00e1", "object": "my-certificate", "type": "cert"}, None, {}, {},
     {}),
    ("pkcs11:token=my-token;object=my-certificate;type=cert;vendor-aaa=value-a"
     "?pin-source=file:/etc/token_pin&vendor-bbb=value-b",
     {"token": "my-token", "object": "my-certificate", "type": "cert"}, None, {"pin-source": "file:/etc/token_pin"},
     {"vendor-aaa": "value-a"}, {"vendor-bbb": "value-b"}),
]


@pytest.mark.parametrize(("text", "path", "object_id", "query", "unknown_path", "unknown_query"), RFC_EXAMPLES,
                         ids=[f"rfc7512-example-{n}" for n in range(1, len(RFC_EXAMPLES) + 1)])
def test_rfc_7512_examples_parse(text: str, path: dict[str, str], object_id: bytes | None, query: dict[str, str],
                                 unknown_path: dict[str, str], unknown_query: dict[str, str]) -> None:
    """Threat: a URI from an HSM vendor's tool is read differently from what the RFC says it names."""
    uri = parse(text)
    assert (uri.path, uri.object_id, uri.query, uri.unknown_path, uri.unknown_query) == (
        path, object_id, query, unknown_path, unknown_query)
    assert parse(format_uri(uri)) == uri  # formatting and parsing again names the same thing


def test_the_rfc_multiline_example_after_removing_its_line_breaks() -> None:
    """The RFC prints example 4 over several lines; the URI is the lines joined."""
    printed = """pkcs11:token=The%20Software%20PKCS%2311%20Softtoken;
                 manufacturer=Snake%20Oil,%20Inc.;
                 model=1.0;
                 object=my-certificate;
                 type=cert;
                 id=%69%95%3E%5C%F4%BD%EC%91;
                 serial=
                 ?pin-source=file:/etc/token_pin"""
    joined = "".join(line.strip() for line in printed.splitlines())
    assert parse(joined) == parse(RFC_EXAMPLES[3][0])
    with pytest.raises(Pkcs11UriError):
        parse(printed)  # the white space itself is not part of the URI


@pytest.mark.parametrize(("text", "message"), [
    ("https://hsm.example/token", "not a PKCS#11 URI"),
    ("pkcs11:token=a;token=b", "appears twice"),
    ("pkcs11:token=a%2", "bad percent-encoding"),
    ("pkcs11:token=a%zz", "bad percent-encoding"),
    ("pkcs11:token=a b", "must be percent-encoded"),
    ("pkcs11:object=k;type=secret", "is not one of"),
    ("pkcs11:slot-id=0x1", "not a decimal number"),
    ("pkcs11:library-version=1.x", "not M or M.N"),
    ("pkcs11:token", "expected name=value"),
    ("pkcs11:token=%FF", "not UTF-8"),
    ("pkcs11:object=k?pin-source=file:/p&pin-value=1234", "both pin-source and pin-value"),
])
def test_malformed_uris_are_refused(text: str, message: str) -> None:
    """Threat: a malformed URI is read as a looser one and matches another token or key."""
    with pytest.raises(Pkcs11UriError, match=message):
        parse(text)


def test_binary_id_and_reserved_characters_round_trip() -> None:
    """Threat: a CKA_ID or label with reserved characters is written back as another URI."""
    uri = Pkcs11Uri(path={"token": "a;b?c&d%e", "object": "key/1"}, object_id=bytes(range(16)),
                    query={"module-path": "/usr/lib/x.so"})
    text = format_uri(uri)
    assert text.startswith("pkcs11:token=a%3Bb%3Fc%26d%25e;object=key%2F1;id=%00%01%02")
    assert parse(text) == uri


def test_pin_value_is_refused_where_a_uri_is_configured() -> None:
    """Threat: a PIN written into a URI lands in a config file or in argv."""
    uri = parse(RFC_EXAMPLES[6][0])
    with pytest.raises(Pkcs11UriError, match="pin-value"):
        uri.refuse_pin_value("token.uri")
    parse(RFC_EXAMPLES[2][0]).refuse_pin_value("token.uri")  # positive control: pin-source is no secret


def test_unknown_path_attribute_matches_nothing() -> None:
    """Threat: a vendor attribute the gateway cannot honour is dropped and the URI matches more keys."""
    with pytest.raises(Pkcs11UriError, match="matches nothing"):
        parse(RFC_EXAMPLES[12][0]).refuse_unknown_path("--uri")
    parse(RFC_EXAMPLES[3][0]).refuse_unknown_path("--uri")  # positive control


# --- profiles name their token by URI ------------------------------------------------------------------


@pytest.mark.parametrize(("uri", "label", "attributes"), [
    ("pkcs11:token=ecny%20prod", "ecny prod", {}),
    ("pkcs11:token=ecny;serial=0123abcd;manufacturer=Snake%20Oil,%20Inc.", "ecny",
     {"serial": "0123abcd", "manufacturer": "Snake Oil, Inc."}),
    ("pkcs11:serial=0123abcd", "", {"serial": "0123abcd"}),
    ("pkcs11:token=ecny;slot-id=7?module-path=/usr/lib/softhsm/libsofthsm2.so", "ecny", {"slot-id": "7"}),
])
def test_profile_token_by_uri(uri: str, label: str, attributes: dict[str, str]) -> None:
    """Positive control: every token attribute of a profile's URI is kept for matching."""
    token = TokenSection(uri=uri)
    assert token.resolved_label() == label
    assert token.match_attributes() == attributes


@pytest.mark.parametrize(("uri", "message"), [
    ("pkcs11:token=a?pin-value=1234", "pin-value"),
    ("pkcs11:token=a?pin-source=file:/etc/pin", "pin-source"),
    ("pkcs11:token=a;object=k", "names a token"),
    ("pkcs11:token=a;vendor-x=1", "unknown path attribute"),
    ("pkcs11:object=k", "names a token"),
    ("pkcs11:?module-name=x", "names no token"),
])
def test_profile_token_uri_refusals(uri: str, message: str) -> None:
    """Threat: a profile's token URI carries a PIN, or names something other than one token."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=message):
        TokenSection(uri=uri)


def test_a_profile_file_with_a_pin_in_its_uri_is_refused(tmp_path: Any) -> None:
    """Threat: a profile file (checked in, shared) carries the token PIN."""
    from gateway.hsm.profile import load_profile, profiles_dir

    text = (profiles_dir() / "softhsm.toml").read_text()
    assert 'label = "' in text
    start = text.index("[token]")
    end = text.index("\n[", start + 1)
    changed = text[:start] + '[token]\nuri = "pkcs11:token=ecny?pin-value=1234"\n' + text[end:]
    path = tmp_path / "pinned.toml"
    path.write_text(changed)
    with pytest.raises(ConfigError, match="pin-value"):
        load_profile(path)
