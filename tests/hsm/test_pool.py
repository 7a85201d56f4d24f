"""The signer pool on the event loop `serve` uses (uvloop): large batches and many concurrent
requests through the worker pipes, every signature verified with `cryptography`."""

from __future__ import annotations

import asyncio
import hashlib
import os
from typing import Any

import pytest
import uvloop
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils

from gateway.hsm.pool import PoolSettings, SignerPool
from gateway.hsm.profile import load_profile, profiles_dir
from tests.conftest import Token

pytestmark = pytest.mark.softhsm


def test_batches_and_concurrency_on_uvloop(softhsm_token: Token) -> None:
    async def scenario() -> None:
        profile = load_profile(profiles_dir() / "softhsm.toml")
        pool = await SignerPool.start(profile, PoolSettings(module_path=profile.module.path,
                                                            token_label=softhsm_token.label,
                                                            pin=softhsm_token.pin, workers=2))
        try:
            key_id = os.urandom(16).hex()
            point = await pool.generate(key_id, f"pool-{key_id[:8]}", "ecdsa-p256")
            public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
            digests = [hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(3000)]
            batches = [digests[i : i + 1000] for i in range(0, 3000, 1000)]  # ~64 KiB back per batch
            results = await asyncio.gather(*(pool.sign_many(key_id, "ecdsa-p256", b) for b in batches))
            singles = await asyncio.gather(*(pool.sign(key_id, "ecdsa-p256", d) for d in digests[:500]))
            signed = [s for batch in results for s in batch]
            assert len(signed) == 3000 and pool.health().workers_up == 2
            pairs = [*zip(digests, signed, strict=True)][::97] + [*zip(digests[:500], singles, strict=True)][::50]
            for digest, signature in pairs:
                der = utils.encode_dss_signature(int.from_bytes(signature[:32], "big"),
                                                 int.from_bytes(signature[32:], "big"))
                public.verify(der, digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
        finally:
            await pool.close()

    uvloop.run(scenario())


def test_a_lock_held_elsewhere_or_a_planted_link_never_stops_a_worker_opening(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    """The opening lock lives in the shared temp dir: whoever holds it, or puts a link in its place,
    can delay a worker by at most OPEN_LOCK_WAIT_S, never stop it, and no link is followed."""
    import fcntl
    import tempfile

    from gateway.hsm import worker

    monkeypatch.setattr(worker, "OPEN_LOCK_WAIT_S", 0.1)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    config = worker.WorkerConfig(module_path="/nowhere.so", token_label="lock-test", pin="0000", algorithms={},
                                 private_template={}, public_template={})
    entered = []
    with worker._opening_alone(config):  # creates the lock file
        entered.append("first")
    [lock_file] = list(tmp_path.iterdir())
    holder = os.open(lock_file, os.O_RDWR)
    fcntl.flock(holder, fcntl.LOCK_EX)  # someone else holds it and never lets go
    try:
        with worker._opening_alone(config):
            entered.append("while held")
    finally:
        os.close(holder)
    victim = tmp_path / "victim"
    lock_file.unlink()
    lock_file.symlink_to(victim)  # a link planted where the lock file goes
    with worker._opening_alone(config):
        entered.append("past a link")
    assert entered == ["first", "while held", "past a link"] and not victim.exists()
