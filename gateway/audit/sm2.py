"""SM2 signature verification in software (GB/T 32918.2-2016 §7, the same as GM/T 0003.2-2012).

Only verification, which handles nothing secret, so plain integer arithmetic is enough (no
constant-time concern). `cryptography` has no SM2 and no maintained PyPI verifier fits: `gmssl`
(pure Python) strips any leading ``0``/``4`` hex digits of a public key (``lstrip("04")``), hard-codes
the user ID and skips the range checks. SM3 comes from the platform's OpenSSL through `hashlib`;
where that OpenSSL has no SM3, :func:`available` is False and SM2 checkpoints are refused.

Checked against the example of GB/T 32918.2 Annex A (its test curve, user ID
``ALICE123@YAHOO.COM``), the example of GB/T 32918.5 / GM/T 0003.5 Annex A (the recommended curve,
user ID ``1234567812345678``) and signatures made by OpenSSL (tests/security/test_audit_trust.py).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

#: GM/T 0009 §10: the user ID signers use when none was agreed; SM2 HSMs apply it in SM2-with-SM3.
DEFAULT_USER_ID = b"1234567812345678"

_Point = tuple[int, int] | None  # None is the point at infinity


@dataclass(frozen=True)
class Curve:
    """Short Weierstrass curve y² = x³ + ax + b over GF(p), base point G of prime order n (cofactor 1)."""

    p: int
    a: int
    b: int
    gx: int
    gy: int
    n: int

    @property
    def size(self) -> int:
        return (self.p.bit_length() + 7) // 8


#: sm2p256v1, the curve of GB/T 32918.5 — the one every SM2 key uses.
SM2P256V1 = Curve(
    p=0xFFFFFFFEFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF00000000FFFFFFFFFFFFFFFF,
    a=0xFFFFFFFEFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF00000000FFFFFFFFFFFFFFFC,
    b=0x28E9FA9E9D9F5E344D5A9E4BCF6509A7F39789F515AB8F92DDBCBD414D940E93,
    gx=0x32C4AE2C1F1981195F9904466A39C9948FE30BBFF2660BE1715A4589334C74C7,
    gy=0xBC3736A2F4F6779C59BDCEE36B692153D0A9877CC62A474002DF32E52139F0A0,
    n=0xFFFFFFFEFFFFFFFFFFFFFFFFFFFFFFFF7203DF6B21C6052B53BBF40939D54123,
)


def available() -> bool:
    """True when the platform's OpenSSL provides SM3 (hashlib)."""
    try:
        hashlib.new("sm3")
    except ValueError:
        return False
    return True


def _sm3(data: bytes) -> bytes:
    return hashlib.new("sm3", data).digest()


def _on_curve(curve: Curve, point: tuple[int, int]) -> bool:
    x, y = point
    return 0 <= x < curve.p and 0 <= y < curve.p and (y * y - (x * x * x + curve.a * x + curve.b)) % curve.p == 0


_Jacobian = tuple[int, int, int]  # (X, Y, Z) for x = X/Z², y = Y/Z³; Z = 0 is the point at infinity
_INFINITY: _Jacobian = (1, 1, 0)


def _double(curve: Curve, point: _Jacobian) -> _Jacobian:
    x, y, z = point
    p = curve.p
    if z == 0 or y == 0:
        return _INFINITY
    yy = y * y % p
    s = 4 * x * yy % p
    m = (3 * x * x + curve.a * pow(z, 4, p)) % p
    x3 = (m * m - 2 * s) % p
    return x3, (m * (s - x3) - 8 * yy * yy) % p, 2 * y * z % p


def _add(curve: Curve, first: _Jacobian, second: _Jacobian) -> _Jacobian:
    if first[2] == 0:
        return second
    if second[2] == 0:
        return first
    p = curve.p
    (x1, y1, z1), (x2, y2, z2) = first, second
    z1z1, z2z2 = z1 * z1 % p, z2 * z2 % p
    u1, u2 = x1 * z2z2 % p, x2 * z1z1 % p
    s1, s2 = y1 * z2 * z2z2 % p, y2 * z1 * z1z1 % p
    if u1 == u2:
        return _double(curve, first) if s1 == s2 else _INFINITY
    h, r = (u2 - u1) % p, (s2 - s1) % p
    hh = h * h % p
    hhh = h * hh % p
    v = u1 * hh % p
    x3 = (r * r - hhh - 2 * v) % p
    return x3, (r * (v - x3) - s1 * hhh) % p, h * z1 * z2 % p


def _affine(curve: Curve, point: _Jacobian) -> _Point:
    x, y, z = point
    if z == 0:
        return None
    inverse = pow(z, -1, curve.p)
    return x * inverse * inverse % curve.p, y * inverse * inverse * inverse % curve.p


def _combination(curve: Curve, k1: int, p1: tuple[int, int], k2: int, p2: tuple[int, int]) -> _Point:
    """k1·P1 + k2·P2 (Shamir's trick: one pass over the bits of both scalars)."""
    j1, j2 = (*p1, 1), (*p2, 1)
    both = _add(curve, j1, j2)
    result = _INFINITY
    for bit in range(max(k1.bit_length(), k2.bit_length()) - 1, -1, -1):
        result = _double(curve, result)
        pick = ((k1 >> bit) & 1, (k2 >> bit) & 1)
        if pick == (1, 1):
            result = _add(curve, result, both)
        elif pick == (1, 0):
            result = _add(curve, result, j1)
        elif pick == (0, 1):
            result = _add(curve, result, j2)
    return _affine(curve, result)


def public_point(private_key: int, curve: Curve = SM2P256V1) -> bytes:
    """d·G as an uncompressed point (for checking a published example's key pair; never used to sign)."""
    point = _combination(curve, private_key, (curve.gx, curve.gy), 0, (curve.gx, curve.gy))
    if point is None:
        raise ValueError("d·G is the point at infinity")
    return b"\x04" + point[0].to_bytes(curve.size, "big") + point[1].to_bytes(curve.size, "big")


def _point(curve: Curve, public_key: bytes) -> tuple[int, int] | None:
    """An uncompressed SEC1 point on the curve, or None."""
    size = curve.size
    if len(public_key) != 1 + 2 * size or public_key[0] != 4:
        return None
    point = int.from_bytes(public_key[1 : 1 + size], "big"), int.from_bytes(public_key[1 + size :], "big")
    return point if _on_curve(curve, point) else None


def user_hash(public_key: bytes, user_id: bytes = DEFAULT_USER_ID, curve: Curve = SM2P256V1) -> bytes:
    """Z_A = SM3(ENTL_A ‖ ID_A ‖ a ‖ b ‖ x_G ‖ y_G ‖ x_A ‖ y_A) (GB/T 32918.2 §5.5)."""
    if len(user_id) >= 8192:
        raise ValueError("an SM2 user ID is shorter than 8192 bytes")
    size = curve.size
    fields = [curve.a, curve.b, curve.gx, curve.gy]
    return _sm3((8 * len(user_id)).to_bytes(2, "big") + user_id
                + b"".join(value.to_bytes(size, "big") for value in fields) + public_key[1:])


def verify(public_key: bytes, message: bytes, signature: bytes, user_id: bytes = DEFAULT_USER_ID,
           curve: Curve = SM2P256V1) -> bool:
    """SM2 verification of ``signature`` (r ‖ s, big-endian, each the curve's size) over ``message``
    with SM3 and ``user_id`` (GB/T 32918.2 §7.1). False, never an exception, for anything invalid."""
    point = _point(curve, public_key)
    size = curve.size
    if point is None or len(signature) != 2 * size:
        return False
    r, s = int.from_bytes(signature[:size], "big"), int.from_bytes(signature[size:], "big")
    if not (1 <= r < curve.n and 1 <= s < curve.n):  # B1, B2
        return False
    e = int.from_bytes(_sm3(user_hash(public_key, user_id, curve) + message), "big")  # B3, B4
    t = (r + s) % curve.n  # B5
    if t == 0:
        return False
    total = _combination(curve, s, (curve.gx, curve.gy), t, point)  # B6
    if total is None:
        return False
    return (e + total[0]) % curve.n == r  # B7
