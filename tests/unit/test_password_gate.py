"""The password check gate (gateway/auth/throttle.py) as pure logic: ``slots`` run, ``waiting`` wait,
the rest are refused at once; a refused or cancelled login leaves no slot taken."""

from __future__ import annotations

import asyncio

import pytest

from gateway.auth.throttle import PasswordCheckGate
from gateway.errors import LoginBusy


async def test_beyond_the_slots_and_the_queue_a_login_is_refused_at_once() -> None:
    """A login flood queues without bound (memory, argon2 work) instead of being turned away."""
    gate = PasswordCheckGate(slots=2, waiting=1)
    release = asyncio.Event()
    ran: list[int] = []

    async def login(n: int) -> None:
        async with gate.admit():
            ran.append(n)
            await release.wait()

    holders = [asyncio.create_task(login(n)) for n in range(3)]  # two run, one waits
    await asyncio.sleep(0)
    assert ran == [0, 1] and gate.busy == 3
    with pytest.raises(LoginBusy) as refused:
        await login(99)
    assert refused.value.retry_after >= 1 and 99 not in ran
    release.set()
    await asyncio.gather(*holders)
    assert sorted(ran) == [0, 1, 2] and gate.busy == 0
    await login(4)  # positive control: free again
    assert ran[-1] == 4


async def test_a_cancelled_waiter_gives_its_place_back() -> None:
    """Clients that hang up while waiting keep the gate closed for everyone."""
    gate = PasswordCheckGate(slots=1, waiting=1)
    release = asyncio.Event()

    async def hold() -> None:
        async with gate.admit():
            await release.wait()

    holder = asyncio.create_task(hold())
    await asyncio.sleep(0)
    waiter = asyncio.create_task(hold())
    await asyncio.sleep(0)
    assert gate.busy == 2
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert gate.busy == 1
    release.set()
    await holder
    assert gate.busy == 0
