"""The two-phase signed operation: every decision commits before the HSM is asked.

1. **Check and record**, in one store transaction: the kind's checks, postings and audit entry, and
   the Idempotency-Key record — the final answer when there is nothing to sign (a pending approval),
   else a *reference* to what was recorded;
2. **commit**;
3. **sign** through the HSM (never holding a ledger lock);
4. **store** the signature and the final answer (completing the idempotency record) in one transaction,
   sent as one batch: the signature is written only where none is stored, the idempotency record is
   completed only if the stored signature is this one, and a last query says whether it is — one round
   trip on PostgreSQL, the ``COMMIT`` included.

A crash between 2 and 4 leaves recorded work without its signature: the next replay of the same
Idempotency-Key (:meth:`SignedOperation.resume`), a read of the resource or the approval that carries
it out (:meth:`SignedOperation.finish`) signs exactly what was recorded, once. Two finishers racing
answer with the same signature: the one whose signature was not kept reads the recorded work again and
answers (and completes its idempotency record) with the stored one.

What differs per kind (a transfer's COSE envelope, a voucher, an EVM transaction, an EIP-712 digest)
is a :class:`SigningStep`; the order of the steps, the idempotency record and the transactions are
here, written once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from gateway.errors import StoreUnavailable
from gateway.ledger.store import Database, Params, Tx
from gateway.operations import idempotency
from gateway.operations.idempotency import Answer, IdempotentRequest

Subject = TypeVar("Subject")
Signature = TypeVar("Signature")
SubjectT = TypeVar("SubjectT")


@dataclass(frozen=True)
class ToSign(Generic[SubjectT]):
    """Step 1's outcome when there is something to sign: the idempotency record refers to ``reference``
    until the answer is final; ``subject`` is what the signing step needs (as recorded: not read back)."""

    reference: str
    subject: SubjectT


@dataclass(frozen=True)
class Stored:
    """A signature a step queued for storing (:meth:`SigningStep.store_in`): the answer it makes, and how
    to tell that it is the signature kept — it is not when another finisher stored the same work's first."""

    answer: Answer
    """The final answer when this signature is the one stored."""
    kept: str
    """A query (``SELECT 1 FROM … WHERE …``) with a row only when the stored signature is this one."""
    kept_params: Params


class SigningStep(Protocol[Subject, Signature]):
    """The kind-specific half of a signed operation: what to sign, how, and how to store it."""

    async def load(self, reference: str) -> Subject:
        """The recorded work a reference names, read from the store (a replay, a read, an approval)."""
        ...

    def answered(self, subject: Subject) -> Answer | None:
        """The answer when there is nothing (more) to sign — signed already, pending, or never to be
        signed; None when the subject waits for its signature."""
        ...

    async def sign(self, subject: Subject) -> Signature:
        """Step 3: the HSM's signature over the recorded payload (no store write)."""
        ...

    def store_in(self, tx: Tx, subject: Subject, signature: Signature) -> Stored:
        """Step 4: queue (:meth:`~gateway.ledger.store.Tx.queue`) the write of the signature where none is
        stored, and say what it answers and how to tell it was kept. Nothing is read here."""
        ...


class SignedOperation(Generic[Subject, Signature]):
    """Runs the four steps of one kind of signed operation (see the module's docstring)."""

    def __init__(self, database: Database, step: SigningStep[Subject, Signature]) -> None:
        self.database = database
        self.step = step

    async def run(self, request: IdempotentRequest | None,
                  record: Callable[[Tx], Answer | ToSign[Subject]]) -> Answer:
        """Steps 1–4 for a new request. ``record`` checks and records (in the transaction it is given)
        and returns the final answer (nothing to sign) or what to sign. A ``record`` that ends the
        transaction itself (PostgreSQL's one-round-trip transfer) records the Idempotency-Key's reference
        before its last statement (:func:`idempotency.refer_in`); nothing more is recorded here then.

        Raises:
            whatever ``record`` raises (nothing is written); IdempotencyRaced (the key has a record, or
            another request with it committed first: nothing of this one is written).
        """

        def check_and_record(tx: Tx) -> Answer | ToSign[Subject]:
            if request is not None:
                request.recorded_in_transaction = False  # (a transaction run again starts afresh)
            idempotency.guard_in(tx, request)
            outcome = record(tx)
            if request is not None and request.recorded_in_transaction:
                return outcome  # ``record`` recorded the reference itself, before its last statement
            if isinstance(outcome, ToSign):
                idempotency.refer_in(tx, request, outcome.reference)
            else:
                idempotency.answer_in(tx, request, outcome)
            return outcome

        try:
            outcome = await self.database.write(check_and_record)  # steps 1 and 2
        except BaseException:
            if request is not None:
                request.recorded_in_transaction = False  # rolled back: nothing of it was recorded
            raise
        if isinstance(outcome, ToSign):
            return await self.finish(outcome.reference, outcome.subject, request)
        return outcome

    async def resume(self, reference: str, request: IdempotentRequest | None = None) -> Answer:
        """A replay meeting a reference record: finish the recorded work as the first request would have."""
        return await self.finish(reference, await self.step.load(reference), request)

    async def reference(self, reference: str) -> Answer:
        """The answer for recorded work, signing it first if it waits for its signature (a read, an approval)."""
        return await self.finish(reference, await self.step.load(reference))

    async def finish(self, reference: str, subject: Subject, request: IdempotentRequest | None = None) -> Answer:
        """Steps 3 and 4 for recorded, committed work (``subject``, as ``reference`` names it); the
        idempotency record (if any) is completed in the transaction that stores the signature — or, when
        the work was signed already, on its own."""
        answer = self.step.answered(subject)
        if answer is not None:
            return await self._answer_signed(answer, request)
        signature = await self.step.sign(subject)  # step 3

        def store(tx: Tx) -> Answer | None:  # step 4: one batch, read once
            stored = self.step.store_in(tx, subject, signature)
            if stored.answer.final:
                idempotency.complete_in(tx, request, stored.answer, kept=(stored.kept, stored.kept_params))
            row = tx.fetchone(f"SELECT EXISTS ({stored.kept}) AS kept", stored.kept_params, then_commit=True)
            return stored.answer if row is not None and row["kept"] else None

        answer = await self.database.write(store)
        if answer is not None:
            return answer
        # Another finisher's signature was stored first (or the work was settled otherwise): answer with it.
        answer = self.step.answered(await self.step.load(reference))
        if answer is None:
            raise StoreUnavailable(f"the signature stored for {reference[:40]} could not be read back")
        return await self._answer_signed(answer, request)

    async def _answer_signed(self, answer: Answer, request: IdempotentRequest | None) -> Answer:
        """The answer of work signed already, completing the idempotency record with it when it is final."""
        if request is not None and answer.final:
            await self.database.write(lambda tx: idempotency.complete_in(tx, request, answer))
        return answer
