"""Raw signing: the SHA-256 digest of a message, signed by the HSM with the `raw-p256` key."""

import hashlib
import json

from ecny import BACKEND, call, key

signer = key("raw-p256")
digest = hashlib.sha256(b"hello from the examples").hexdigest()
signed = call("POST", f"/v1/keys/{signer['key_id']}/sign", BACKEND, {"digest": digest})
# `signature` is raw r||s (64 bytes), `der` the same as DER; verify with the key's public_key_pem.
print(json.dumps({"digest": digest, "signature": signed["signature"], "der": signed["der"],
                  "public_key_pem": signer["public_key_pem"]}))
