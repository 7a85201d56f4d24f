"""A key ceremony, as a process of its own: make EC P-256 key pairs in a token with python-pkcs11 and print
what the ceremony would hand over (label, CKA_ID, public point) as JSON.

    python -m tests.ceremony MODULE_PATH TOKEN_LABEL PIN_FILE SPEC_JSON

SPEC_JSON: a list of {"label", "key_id" (hex), "private": {attribute name: bool}}. A process of its own
because a PKCS#11 library reads its token list once, at C_Initialize: a test process that had loaded the
library before the ceremony's token was made would not see it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pkcs11
from pkcs11.util.ec import encode_named_curve_parameters

P256 = "1.2.840.10045.3.1.7"


def make_key(session: Any, label: str, key_id: bytes, private: dict[str, bool]) -> dict[str, str]:
    attribute = pkcs11.Attribute
    params = session.create_domain_parameters(
        pkcs11.KeyType.EC, {attribute.EC_PARAMS: encode_named_curve_parameters(P256)}, local=True)
    template = {attribute.TOKEN: True, attribute.SIGN: True, attribute.SENSITIVE: True,
                attribute.EXTRACTABLE: False, attribute.PRIVATE: True}
    template.update({getattr(attribute, name.upper()): value for name, value in private.items()})
    public, _ = params.generate_keypair(store=True, label=label, id=key_id,
                                        public_template={attribute.TOKEN: True, attribute.VERIFY: True},
                                        private_template=template)
    point = bytes(public[attribute.EC_POINT])
    point = point[2:] if point[0] == 0x04 and point[1] == 65 else point  # DER OCTET STRING around the point
    return {"label": label, "key_id": key_id.hex(), "point": point.hex()}


def main(module_path: str, token_label: str, pin_file: str, spec: str) -> None:
    token = pkcs11.lib(module_path).get_token(token_label=token_label)
    with token.open(user_pin=Path(pin_file).read_text().strip(), rw=True) as session:
        made = [make_key(session, item["label"], bytes.fromhex(item["key_id"]), item.get("private", {}))
                for item in json.loads(spec)]
    print(json.dumps(made))


if __name__ == "__main__":
    main(*sys.argv[1:5])
