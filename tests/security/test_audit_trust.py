"""Issue 14, items 1 and 10: the audit chain verified by an outsider who trusts only pinned keys.

Each attack is the one an insider with write access to the database would run: copy the live
database, rewrite an entry, re-hash the chain after it, and then make the checkpoints agree — by a
row that says ``sm2`` (which used to be skipped with a warning), by signing with a key of the key
table that is not an audit key (the HSM's own ``raw`` key, through the API), by a key of their own
inserted into the key table, or by cutting off the tail together with the checkpoints after it.
``ecny-gateway audit verify`` runs for real (a subprocess) on the rewritten copy.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import multiprocessing
import shutil
import sqlite3
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils

from gateway import cli
from gateway.audit import sm2, witness
from gateway.audit.chain import GENESIS, checkpoint_message, entry_hash
from gateway.auth.roles import Role
from gateway.errors import ConfigError
from gateway.keys import public_key_pem
from gateway.runtime import RUNTIME
from gateway.signing import Algorithm
from tests.api.support import assert_problem
from tests.conftest import Gateway

pytestmark = pytest.mark.softhsm


@dataclass
class Copy:
    """A copy of the live database and of its witness, taken at one moment, plus the pinned key."""

    db: Path
    witness: Path
    audit_key_id: str
    audit_pem: Path

    def verify(self, *extra: str, pin: bool = True) -> subprocess.CompletedProcess[str]:
        pinned = ("--public-key", f"{self.audit_key_id}={self.audit_pem}") if pin else ()
        return subprocess.run(
            [sys.executable, "-m", "gateway.cli", "audit", "verify", "--db", f"sqlite:///{self.db}", *pinned, *extra],
            capture_output=True, text=True, timeout=60,
        )

    def rows(self) -> sqlite3.Connection:
        connection = sqlite3.connect(self.db)
        connection.row_factory = sqlite3.Row
        return connection


async def _activity(gateway: Gateway, raw_keys: dict[str, Any], count: int) -> None:
    for i in range(count):
        response = await gateway.client.post(
            f"/v1/keys/{raw_keys['p256']['key_id']}/sign", json={"digest": hashlib.sha256(b"trust%d" % i).hexdigest()},
            headers=gateway.auth(Role.BACKEND),
        )
        assert response.status == 200, await response.text()


def _witness_of(gateway: Gateway) -> Path:
    return witness.witness_path(gateway.settings.audit.witness_file, gateway.settings.store.dsn)


async def _copy(gateway: Gateway, raw_keys: dict[str, Any], target: Path) -> Copy:
    """Three signed checkpoints at least, a short unsigned tail, then the copies."""
    audit = gateway.client.server.app[RUNTIME].audit
    for _ in range(3):
        await _activity(gateway, raw_keys, 4)
        await audit.checkpoint()  # None when a checkpoint by count already signed this head
    await _activity(gateway, raw_keys, 2)
    source = sqlite3.connect(gateway.settings.store.dsn.removeprefix("sqlite:///"))
    copy = sqlite3.connect(target / "copy.db")
    source.backup(copy)
    source.close()
    copy.close()
    shutil.copyfile(_witness_of(gateway), target / "witness.jsonl")  # no await since the backup: same moment
    pem = target / "audit.pem"
    pem.write_text(raw_keys["audit"]["public_key_pem"])
    return Copy(target / "copy.db", target / "witness.jsonl", raw_keys["audit"]["key_id"], pem)


@pytest.fixture
async def copy(gateway: Gateway, raw_keys: dict[str, Any], tmp_path: Path) -> Copy:
    return await _copy(gateway, raw_keys, tmp_path)


def _rewrite(copy: Copy) -> list[tuple[int, bytes]]:
    """The insider's rewrite: change entry 2, re-hash every entry after it and point every checkpoint
    at the new hashes. Returns (seq, new head hash) of each checkpoint, for whoever re-signs them."""
    with copy.rows() as connection:
        connection.execute("UPDATE audit_log SET actor = 'client:nobody' WHERE seq = 2")
        prev, hashes = GENESIS, {}
        for row in connection.execute("SELECT * FROM audit_log ORDER BY seq").fetchall():
            digest = entry_hash(prev, dict(row))
            connection.execute("UPDATE audit_log SET prev_hash = ?, entry_hash = ? WHERE seq = ?",
                               (prev, digest, row["seq"]))
            prev = hashes[row["seq"]] = digest
        checkpoints = [int(seq) for (seq,) in connection.execute("SELECT seq FROM audit_checkpoints")]
        for seq in checkpoints:
            connection.execute("UPDATE audit_checkpoints SET head_hash = ? WHERE seq = ?", (hashes[seq], seq))
    return [(seq, hashes[seq]) for seq in checkpoints]


def _resign(copy: Copy, signatures: dict[int, bytes], key_id: str, algorithm: str) -> None:
    with copy.rows() as connection:
        for seq, signature in signatures.items():
            connection.execute("UPDATE audit_checkpoints SET signature = ?, key_id = ?, algorithm = ? WHERE seq = ?",
                               (signature, key_id, algorithm, seq))


def _insert_key(copy: Copy, key_id: str, algorithm: str, usages: str, public_key: bytes) -> None:
    with copy.rows() as connection:
        connection.execute(
            "INSERT INTO keys (key_id, label, algorithm, usages, public_key, created_at, created_by) "
            "VALUES (?, ?, ?, ?, ?, '2026-01-01T00:00:00Z', 'insider')",
            (key_id, f"insider-{key_id[:8]}", algorithm, usages, public_key),
        )


class _SoftwareKey:
    """The insider's own P-256 key, outside any HSM."""

    def __init__(self) -> None:
        self.private = ec.generate_private_key(ec.SECP256R1())
        self.point = self.private.public_key().public_bytes(serialization.Encoding.X962,
                                                            serialization.PublicFormat.UncompressedPoint)

    def sign(self, seq: int, head_hash: bytes) -> bytes:
        digest = hashlib.sha256(checkpoint_message(seq, head_hash)).digest()
        r, s = utils.decode_dss_signature(self.private.sign(digest, ec.ECDSA(utils.Prehashed(hashes.SHA256()))))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")


# --- positive control -----------------------------------------------------------------------------


def test_untouched_chain_verifies_with_pinned_key_and_witness(copy: Copy) -> None:
    """Positive control: an untouched chain, the pinned audit key and the witness → exit 0."""
    lines = copy.witness.read_text().splitlines()
    assert lines, "every checkpoint the gateway signed is in the witness"
    result = copy.verify("--witness", str(copy.witness))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "audit chain intact" in result.stdout and f"trust: pinned keys {copy.audit_key_id}" in result.stdout
    assert "NOT an outsider-grade" not in result.stderr


def test_unpinned_verification_says_it_is_not_outsider_grade(copy: Copy) -> None:
    """Unpinned verification trusts the database's own key table: allowed as an operator's self-check,
    but it says loudly that it is not outsider-grade."""
    result = copy.verify(pin=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "NOT an outsider-grade verification" in result.stderr
    assert "trust: key table, not outsider-grade" in result.stdout


# --- item 1: the row does not choose how it is verified --------------------------------------------


def test_rewritten_chain_with_sm2_checkpoint_rows_fails(copy: Copy) -> None:
    """Rewritten chain passed off as SM2: checkpoint rows saying algorithm=sm2 over a re-hashed chain."""
    _rewrite(copy)
    with copy.rows() as connection:
        connection.execute("UPDATE audit_checkpoints SET algorithm = 'sm2'")
        first = connection.execute("SELECT MIN(seq) FROM audit_checkpoints").fetchone()[0]
    for pin in (True, False):
        result = copy.verify(pin=pin)
        assert result.returncode == 1, result.stdout + result.stderr
        assert f"BROKEN at entry {first}: checkpoint at {first} says algorithm 'sm2'" in result.stdout


# --- SM2: verified in software against the GB/T 32918 examples and OpenSSL -------------------------

#: GB/T 32918.2-2016 Annex A (also GM/T 0003.2-2012, draft-shen-sm2-ecdsa): a 256-bit test curve.
GBT_TEST_CURVE = sm2.Curve(
    p=0x8542D69E4C044F18E8B92435BF6FF7DE457283915C45517D722EDB8B08F1DFC3,
    a=0x787968B4FA32C3FD2417842E73BBFEFF2F3C848B6831D7E0EC65228B3937E498,
    b=0x63E4C6D3B23B0C849CF84241484BFE48F61D59A5B16BA06E6E12D1DA27C5249A,
    gx=0x421DEBD61B62EAB6746434EBC3CC315E32220B3BADD50BDC4C4E6C147FEDD43D,
    gy=0x0680512BCBB42C07D47349D2153B70C4E5D7FDFCBFA36EA1A85841B9E46E09A2,
    n=0x8542D69E4C044F18E8B92435BF6FF7DD297720630485628D5AE74EE7C32E79B7,
)
#: (curve, user ID, private key, published public key or "", published Z_A or "", r ‖ s) for "message digest".
GBT_EXAMPLES = [
    (GBT_TEST_CURVE, b"ALICE123@YAHOO.COM", 0x128B2FA8BD433C6C068C8D803DFF79792A519A55171B1B650C23661D15897263,
     "040AE4C7798AA0F119471BEE11825BE46202BB79E2A5844495E97C04FF4DF2548A"
     "7C0240F88F1CD4E16352A73C17B7F16F07353E53A176D684A9FE0C6BB798E857",
     "F4A38489E32B45B6F876E3AC2168CA392362DC8F23459C1D1146FC3DBFB7BC9A",
     "40F1EC59F793D9F49E09DCEF49130D4194F79FB1EED2CAA55BACDB49C4E755D1"
     "6FC6DAC32C5D5CF10C77DFB20F7C2EB667A457872FB09EC56327A67EC7DEEBE7"),
    # GB/T 32918.5-2017 / GM/T 0003.5-2012 Annex A: the recommended curve and the default user ID.
    (sm2.SM2P256V1, sm2.DEFAULT_USER_ID, 0x3945208F7B2144B13F36E38AC6D39F95889393692860B51A42FB81EF4DF7C5B8,
     "0409F9DF311E5421A150DD7D161E4BC5C672179FAD1833FC076BB08FF356F35020"
     "CCEA490CE26775A52DC6EA718CC1AA600AED05FBF35E084A6632F6072DA9AD13", "",
     "F5A03B0648D2C4630EEAC513E1BB81A15944DA3827D5B74143AC7EACEEE720B3"
     "B1B6AA29DF212FD8763182BC0D421CA1BB9038FD1F7F42D4840B69C485BBC1AA"),
]


@pytest.mark.parametrize("example", GBT_EXAMPLES, ids=["32918.2-test-curve", "32918.5-sm2p256v1"])
def test_sm2_verifier_matches_the_gbt_32918_examples(example: tuple[Any, ...]) -> None:
    """An SM2 checkpoint taken on trust because the verifier cannot check SM2: the software verifier
    reproduces the standard's examples, and refuses every altered input."""
    curve, user_id, private_key, public_hex, z_hex, signature_hex = example
    public_key = sm2.public_point(private_key, curve)
    assert public_key == bytes.fromhex(public_hex)
    if z_hex:
        assert sm2.user_hash(public_key, user_id, curve) == bytes.fromhex(z_hex)
    signature = bytes.fromhex(signature_hex)
    assert sm2.verify(public_key, b"message digest", signature, user_id, curve)
    n = curve.n.to_bytes(32, "big")
    for message, sig, uid in (
        (b"message digesu", signature, user_id),  # another message
        (b"message digest", signature[:31] + bytes([signature[31] ^ 1]) + signature[32:], user_id),  # r changed
        (b"message digest", signature, user_id + b"x"),  # another user ID (Z_A)
        (b"message digest", bytes(32) + signature[32:], user_id),  # r = 0
        (b"message digest", signature[:32] + n, user_id),  # s = n, out of range
        (b"message digest", signature[:32], user_id),  # truncated
    ):
        assert not sm2.verify(public_key, message, sig, uid, curve)
    off_curve = public_key[:-1] + bytes([public_key[-1] ^ 1])
    assert not sm2.verify(off_curve, b"message digest", signature, user_id, curve)


def _openssl_sm2_key(directory: Path) -> tuple[Path, bytes]:
    """A key pair made by OpenSSL, standing in for an SM2 HSM: (private key file, public point)."""
    key = directory / "sm2-key.pem"
    subprocess.run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:SM2", "-out", str(key)],
                   check=True, capture_output=True)
    der = subprocess.run(["openssl", "pkey", "-in", str(key), "-pubout", "-outform", "DER"], check=True,
                         capture_output=True).stdout
    return key, der[-65:]


def _openssl_sm2_sign(key: Path, message: bytes, directory: Path) -> bytes:
    """SM2-with-SM3 by OpenSSL with the GM/T 0009 default user ID, as r ‖ s."""
    source = directory / "message.bin"
    source.write_bytes(message)
    der = subprocess.run(["openssl", "pkeyutl", "-sign", "-inkey", str(key), "-rawin", "-digest", "sm3",
                          "-pkeyopt", "distid:1234567812345678", "-in", str(source)],
                         check=True, capture_output=True).stdout
    r, s = utils.decode_dss_signature(der)
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def test_sm2_verifier_agrees_with_openssl(tmp_path: Path) -> None:
    """Positive control: SM2 signatures OpenSSL makes over checkpoint messages verify; altered ones do not."""
    key, point = _openssl_sm2_key(tmp_path)
    for seq in (1, 10, 1000):
        message = checkpoint_message(seq, hashlib.sha256(b"%d" % seq).digest())
        signature = _openssl_sm2_sign(key, message, tmp_path)
        assert sm2.verify(point, message, signature)
        assert not sm2.verify(point, checkpoint_message(seq + 1, hashlib.sha256(b"%d" % seq).digest()), signature)


def test_sm2_checkpoints_verify_against_the_pinned_sm2_key_only(
    copy: Copy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """SM2 audit key (a GM HSM): its checkpoints verify with the pinned key, in either PEM form; a
    forged SM2 signature, an unpinned SM2 key and a table that relabels the P-256 key as SM2 fail."""
    checkpoints = _rewrite(copy)  # as if an SM2 HSM had signed this chain's checkpoints
    key, point = _openssl_sm2_key(tmp_path)
    sm2_key_id = "5a2" + "0" * 29
    _insert_key(copy, sm2_key_id, "sm2", "audit", point)
    _resign(copy, {seq: _openssl_sm2_sign(key, checkpoint_message(seq, head), tmp_path) for seq, head in checkpoints},
            sm2_key_id, "sm2")
    point_block = tmp_path / "sm2-point.pem"
    point_block.write_text(public_key_pem(Algorithm.SM2, point))  # what `keys show` prints
    spki = tmp_path / "sm2-spki.pem"
    spki.write_bytes(subprocess.run(["openssl", "pkey", "-in", str(key), "-pubout"], check=True,
                                    capture_output=True).stdout)

    def run(pem: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "gateway.cli", "audit", "verify", "--db", f"sqlite:///{copy.db}",
                               "--public-key", f"{sm2_key_id}={pem}"], capture_output=True, text=True, timeout=60)

    for pem in (point_block, spki):
        result = run(pem)
        assert result.returncode == 0, result.stdout + result.stderr
    # Where the platform's OpenSSL has no SM3 the same checkpoints are refused, not skipped.
    monkeypatch.setattr(sm2, "available", lambda: False)
    code = cli.main(["audit", "verify", "--db", f"sqlite:///{copy.db}", "--public-key", f"{sm2_key_id}={spki}"])
    assert code == 1 and "SM2 signature: refused" in capsys.readouterr().out
    monkeypatch.undo()
    assert copy.verify(pin=False).returncode == 0
    first = checkpoints[0][0]
    not_pinned = copy.verify()  # the outsider pinned the P-256 audit key, not this SM2 key
    assert not_pinned.returncode == 1 and f"key {sm2_key_id} is not pinned" in not_pinned.stdout, not_pinned.stdout
    with copy.rows() as connection:
        signature = bytes(connection.execute("SELECT signature FROM audit_checkpoints WHERE seq = ?",
                                             (first,)).fetchone()[0])
        connection.execute("UPDATE audit_checkpoints SET signature = ? WHERE seq = ?",
                           (signature[:63] + bytes([signature[63] ^ 1]), first))
    forged = run(spki)
    assert forged.returncode == 1, forged.stdout + forged.stderr
    assert f"BROKEN at entry {first}: checkpoint at {first} has an invalid signature" in forged.stdout
    # The unpinned verifier takes the algorithm from the key table: relabelling the P-256 audit key
    # and its checkpoints as SM2 gets no row skipped — each is checked as SM2, and fails.
    with copy.rows() as connection:
        connection.execute("UPDATE keys SET algorithm = 'sm2' WHERE key_id = ?", (copy.audit_key_id,))
        connection.execute("UPDATE audit_checkpoints SET key_id = ?, signature = ?",
                           (copy.audit_key_id, bytes(64)))
    relabelled = copy.verify(pin=False)
    assert relabelled.returncode == 1 and "invalid signature" in relabelled.stdout, relabelled.stdout


async def test_checkpoints_signed_with_a_raw_key_are_refused(
    gateway: Gateway, raw_keys: dict[str, Any], tmp_path: Path
) -> None:
    """Checkpoints re-signed by a key of the key table without `audit` usage (the HSM's `raw` key)."""
    copy = await _copy(gateway, raw_keys, tmp_path)
    checkpoints = _rewrite(copy)
    raw = raw_keys["p256"]
    signatures = {}
    for seq, head_hash in checkpoints:  # real HSM signatures, asked for through the API as a backend would
        digest = hashlib.sha256(checkpoint_message(seq, head_hash)).hexdigest()
        response = await gateway.client.post(f"/v1/keys/{raw['key_id']}/sign", json={"digest": digest},
                                             headers=gateway.auth(Role.BACKEND))
        assert response.status == 200, await response.text()
        signatures[seq] = bytes.fromhex((await response.json())["signature"])
    _resign(copy, signatures, raw["key_id"], "ecdsa-p256")
    first = checkpoints[0][0]
    unpinned = await asyncio.to_thread(copy.verify, pin=False)
    assert unpinned.returncode == 1, unpinned.stdout + unpinned.stderr
    assert f"checkpoint at {first} is signed by a key that is not trusted: key {raw['key_id']} has usages ['raw']" \
        in unpinned.stdout
    pinned = await asyncio.to_thread(copy.verify)
    assert pinned.returncode == 1 and f"key {raw['key_id']} is not pinned" in pinned.stdout, pinned.stdout
    # Pinning the raw key itself by mistake does not help either: the key table says it is no audit key.
    raw_pem = tmp_path / "raw.pem"
    raw_pem.write_text(raw["public_key_pem"])
    mistaken = await asyncio.to_thread(subprocess.run, [
        sys.executable, "-m", "gateway.cli", "audit", "verify", "--db", f"sqlite:///{copy.db}",
        "--public-key", f"{raw['key_id']}={raw_pem}"], capture_output=True, text=True, timeout=60)
    assert mistaken.returncode == 1 and "not 'audit'" in mistaken.stdout, mistaken.stdout


def test_insider_key_added_to_the_key_table_is_refused_when_pinning(copy: Copy) -> None:
    """An insider's own key inserted into the key table (as `audit`, or as `raw`) signs a rewritten chain."""
    checkpoints = _rewrite(copy)
    insider = _SoftwareKey()
    first = checkpoints[0][0]
    for usage, key_id in (("raw", "1" * 32), ("audit", "2" * 32)):
        _insert_key(copy, key_id, "ecdsa-p256", usage, insider.point)
        _resign(copy, {seq: insider.sign(seq, head) for seq, head in checkpoints}, key_id, "ecdsa-p256")
        pinned = copy.verify()
        assert pinned.returncode == 1, pinned.stdout + pinned.stderr
        assert f"checkpoint at {first} is signed by a key that is not trusted: key {key_id} is not pinned" \
            in pinned.stdout
        unpinned = copy.verify(pin=False)
        if usage == "raw":
            assert unpinned.returncode == 1 and "not 'audit'" in unpinned.stdout, unpinned.stdout
        else:
            # The documented limit of unpinned verification: whoever writes the key table is trusted.
            assert unpinned.returncode == 0 and "NOT an outsider-grade" in unpinned.stderr, unpinned.stdout


def test_checkpoint_by_an_unknown_key_fails(copy: Copy) -> None:
    """A checkpoint naming a key that is neither pinned nor in the key table."""
    checkpoints = _rewrite(copy)
    insider = _SoftwareKey()
    _resign(copy, {seq: insider.sign(seq, head) for seq, head in checkpoints}, "f" * 32, "ecdsa-p256")
    for pin in (True, False):
        result = copy.verify(pin=pin)
        assert result.returncode == 1 and "neither pinned nor in the key table" in result.stdout, result.stdout


# --- item 10: a cut tail --------------------------------------------------------------------------


def _cut_tail(copy: Copy) -> int:
    """Delete the last entries and the checkpoints after them, down to the first checkpoint."""
    with copy.rows() as connection:
        keep = int(connection.execute("SELECT MIN(seq) FROM audit_checkpoints").fetchone()[0])
        connection.execute("DELETE FROM audit_log WHERE seq > ?", (keep,))
        connection.execute("DELETE FROM audit_checkpoints WHERE seq > ?", (keep,))
    return keep


def test_cut_tail_is_caught_by_the_witness(copy: Copy) -> None:
    """Tail truncation: the last entries deleted with the checkpoints after them."""
    keep = _cut_tail(copy)
    last_witnessed = max(json.loads(line)["seq"] for line in copy.witness.read_text().splitlines())
    assert last_witnessed > keep
    # Without the witness the shorter chain is consistent and signed: the documented limit.
    alone = copy.verify()
    assert alone.returncode == 0, alone.stdout + alone.stderr
    assert "no --witness: a chain whose last entries were deleted" in alone.stderr
    result = copy.verify("--witness", str(copy.witness))
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"the chain ends at entry {keep}, before the checkpoint at" in result.stdout
    assert "its tail was cut off" in result.stdout


def test_deleted_checkpoint_is_missing_from_the_witnessed_chain(copy: Copy) -> None:
    """A witnessed checkpoint row deleted while its entries stay."""
    with copy.rows() as connection:
        seq = connection.execute("SELECT MAX(seq) FROM audit_checkpoints").fetchone()[0]
        connection.execute("DELETE FROM audit_checkpoints WHERE seq = ?", (seq,))
    result = copy.verify("--witness", str(copy.witness))
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"the checkpoint at {seq} the witness holds" in result.stdout
    assert "missing from the database" in result.stdout


def test_rewritten_chain_resigned_by_an_inserted_key_disagrees_with_the_witness(copy: Copy) -> None:
    """A re-hashed chain re-signed by an insider's key inserted into the key table as `audit`: unpinned
    verification trusts that table, so only the witness shows the checkpoints were replaced."""
    checkpoints = _rewrite(copy)
    insider = _SoftwareKey()
    _insert_key(copy, "3" * 32, "ecdsa-p256", "audit", insider.point)
    _resign(copy, {seq: insider.sign(seq, head) for seq, head in checkpoints}, "3" * 32, "ecdsa-p256")
    assert copy.verify(pin=False).returncode == 0  # the documented limit of trusting the key table
    result = copy.verify("--witness", str(copy.witness), pin=False)
    assert result.returncode == 1, result.stdout + result.stderr
    first_witnessed = min(json.loads(line)["seq"] for line in copy.witness.read_text().splitlines())
    assert f"the checkpoint at {first_witnessed} differs from the one the witness holds" in result.stdout


def test_malformed_witness_is_an_error_naming_the_line(copy: Copy) -> None:
    """A witness that is not what the gateway writes is refused (exit 2), never read as empty."""
    with copy.witness.open("a") as handle:
        handle.write('{"seq": "x"}\n')
    lines = len(copy.witness.read_text().splitlines())
    result = copy.verify("--witness", str(copy.witness))
    assert result.returncode == 2 and f"line {lines} is not a checkpoint" in result.stderr, result.stderr


def test_witness_file_is_private_and_holds_what_the_database_holds(gateway: Gateway, copy: Copy) -> None:
    """The witness is created 0600 and every line equals the database's checkpoint row byte for byte."""
    mode = stat.S_IMODE(_witness_of(gateway).stat().st_mode)
    assert mode == 0o600, oct(mode)
    records, warnings = witness.read(copy.witness)
    assert not warnings
    with copy.rows() as connection:
        for _, record in records:
            row = connection.execute("SELECT * FROM audit_checkpoints WHERE seq = ?", (record.seq,)).fetchone()
            assert witness.WitnessRecord.from_row(row) == record


def _append_many(path: str, writer: int) -> None:
    for i in range(200):
        witness.append(Path(path), witness.WitnessRecord(writer * 1000 + i + 1, bytes(32), "k" * 32, "ecdsa-p256",
                                                         bytes(64), "2026-01-01T00:00:00Z"))


def test_witness_appends_from_several_processes_stay_whole(tmp_path: Path) -> None:
    """Several gateway processes append checkpoints to one witness at once: no torn or lost line."""
    path = tmp_path / "witness.jsonl"
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_append_many, args=(str(path), n)) for n in range(4)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(60)
        assert process.exitcode == 0
    records, warnings = witness.read(path)
    assert not warnings
    assert sorted(record.seq for _, record in records) == sorted(n * 1000 + i + 1 for n in range(4) for i in range(200))


def test_witness_is_not_written_through_a_symlink(tmp_path: Path) -> None:
    """A witness path replaced by a symbolic link (to make the gateway append elsewhere) is refused."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text("")
    link = tmp_path / "witness.jsonl"
    link.symlink_to(elsewhere)
    with pytest.raises(OSError):
        witness.append(link, witness.WitnessRecord(1, bytes(32), "k", "ecdsa-p256", bytes(64), "t"))
    assert elsewhere.read_text() == ""


# --- GET /v1/audit/checkpoints --------------------------------------------------------------------


async def test_checkpoints_endpoint_pages_what_the_witness_holds(gateway: Gateway, copy: Copy) -> None:
    """Positive control: outside collectors copy the checkpoints page by page (`after`, `limit`)."""
    seen: list[dict[str, Any]] = []
    after = 0
    while True:
        response = await gateway.client.get("/v1/audit/checkpoints", params={"after": str(after), "limit": "2"},
                                             headers=gateway.auth(Role.AUDITOR))
        assert response.status == 200, await response.text()
        page = await response.json()
        assert len(page["checkpoints"]) <= 2
        seen.extend(page["checkpoints"])
        if page["next_after"] is None:
            break
        assert page["next_after"] == page["checkpoints"][-1]["seq"]
        after = page["next_after"]
    numbers = [document["seq"] for document in seen]
    assert len(numbers) >= 3 and numbers == sorted(set(numbers))
    # What the endpoint serves is what the witness holds: a collector's copy is a witness file.
    witnessed = {json.loads(line)["seq"]: json.loads(line) for line in copy.witness.read_text().splitlines()}
    for document in seen:
        if document["seq"] in witnessed:
            assert witnessed[document["seq"]] == document
    collected = copy.db.parent / "collected.jsonl"
    collected.write_text("".join(json.dumps(d) + "\n" for d in seen if d["seq"] <= max(witnessed)))
    result = await asyncio.to_thread(copy.verify, "--witness", str(collected))
    assert result.returncode == 0, result.stdout + result.stderr
    response = await gateway.client.get("/v1/audit/checkpoints", params={"limit": "1"},
                                        headers=gateway.auth(Role.ADMIN))
    assert response.status == 200


@pytest.mark.parametrize("role", [Role.TELLER, Role.BACKEND, Role.SUPERVISOR])
async def test_checkpoints_endpoint_is_for_auditors_only(gateway: Gateway, role: Role) -> None:
    """A teller, backend or supervisor reading the checkpoints (the audit trail is the auditors')."""
    response = await gateway.client.get("/v1/audit/checkpoints", headers=gateway.auth(role))
    await assert_problem(response, 403, "forbidden")


async def test_checkpoints_endpoint_refuses_bad_paging(gateway: Gateway) -> None:
    """Paging parameters out of range get a problem document, not a 500."""
    for params in ({"limit": "0"}, {"limit": "1001"}, {"after": "-1"}, {"after": "1e3"}):
        response = await gateway.client.get("/v1/audit/checkpoints", params=params, headers=gateway.auth(Role.AUDITOR))
        await assert_problem(response, 400)


def test_unwritable_witness_stops_the_gateway_at_start(tmp_path: Path) -> None:
    """A witness path the gateway cannot append to (a careless config) is found at start-up, not at
    the first checkpoint, when it would silently leave the tail unwitnessed."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=r"audit\.witness_file: cannot append to"):
        witness.prepare(blocker / "audit-witness.jsonl")
