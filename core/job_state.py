"""The job state machine: every write to a job's row after it is created, in one place.

A job is queued, then running, then succeeded, failed or cancelled; the last three are final.
Each transition below is one conditional UPDATE: it applies only while the row is in one of
the transition's source states (and, for a worker's writes, only while the worker's attempt
still owns it), so two writers racing for a row cannot both win::

    queued --claim--> running --finish--> succeeded | failed | cancelled
    queued --cancel--> cancelled                 (a queued job stops at once)
    running --beat--> running                    (lease, progress; reads the cancel flag)
    running --ask_cancel--> running              (the worker stops at its next beat)
    running --hand_back--> queued                (worker shutdown: no attempt used up)
    running --recover--> queued | failed | cancelled   (the sweep: the lease ran out)
    queued --ring_again--> queued                (the sweep re-sends a lost message)

The worker's side is ``worker.lifecycle`` (retries, the heartbeat thread), the API's the routes
and ``app.sweeper``; both write through here. Writes that are not transitions (the version a
job recorded, the delivery of its webhook) are here too, so that this module is the only one
that updates a job.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, select, update
from sqlalchemy.orm import Session

from core.db import utcnow
from core.models import Job, JobStatus

Q, R = JobStatus.QUEUED, JobStatus.RUNNING
S, F, C = JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED
FINAL = frozenset({S, F, C})

# name -> (the states it applies in, the states it may leave the job in)
TRANSITIONS: dict[str, tuple[frozenset[JobStatus], frozenset[JobStatus]]] = {
    "claim": (frozenset({Q}), frozenset({R})),
    "cancel": (frozenset({Q}), frozenset({C})),
    "ring_again": (frozenset({Q}), frozenset({Q})),
    "beat": (frozenset({R}), frozenset({R})),
    "ask_cancel": (frozenset({R}), frozenset({R})),
    "finish": (frozenset({R}), FINAL),
    "hand_back": (frozenset({R}), frozenset({Q})),
    "recover": (frozenset({R}), frozenset({Q, F, C})),
}


def allowed(source: JobStatus, target: JobStatus) -> bool:
    """Whether any transition takes a job from ``source`` to ``target``."""
    return any(source in s and target in t for s, t in TRANSITIONS.values())


def progress_record(stage: str, fraction: float, message: str = "") -> dict:
    """The ``progress`` column outside training (epochs are filled in while training)."""
    return {"stage": stage, "fraction": fraction, "epoch": None, "epochs": None, "message": message}


def _move(
    session: Session,
    transition: str,
    where: Iterable[ColumnElement[bool]],
    target: JobStatus | None = None,
    **values: Any,
) -> int:
    """Apply ``transition`` to the rows ``where`` selects that are in its source states;
    ``target`` (one of its target states) becomes their status. Returns the rows changed."""
    sources, targets = TRANSITIONS[transition]
    if target is not None:
        if target not in targets:
            raise ValueError(f"{transition} cannot leave a job {target}")
        values["status"] = target
    statement = update(Job).where(*where, Job.status.in_(sources)).values(**values)
    return session.execute(statement).rowcount


def _owned(job_id: str, attempt: int) -> tuple[ColumnElement[bool], ...]:
    return Job.id == job_id, Job.attempt == attempt


# The worker's transitions ----------------------------------------------------------------


def claim(session: Session, job_id: str, lease_s: float, worker: str) -> int | None:
    """queued -> running: the attempt number taken, or None (someone else has it, or no
    attempt is left)."""
    now = utcnow()
    claimed = _move(
        session,
        "claim",
        (Job.id == job_id, Job.attempt < Job.max_attempts),
        R,
        attempt=Job.attempt + 1,
        lease_expires_at=now + timedelta(seconds=lease_s),
        started_at=now,
        worker=worker,
        progress=progress_record("loading", 0.0, "claimed"),
    )
    return session.scalar(select(Job.attempt).where(Job.id == job_id)) if claimed else None


def beat(
    session: Session, job_id: str, attempt: int, lease_s: float, progress: dict | None
) -> tuple[bool, bool]:
    """Extend the attempt's lease (and save its progress): (whether it still owns the job,
    whether a cancel was asked for)."""
    values: dict[str, Any] = {"lease_expires_at": utcnow() + timedelta(seconds=lease_s)}
    if progress is not None:
        values["progress"] = progress
    kept = bool(_move(session, "beat", _owned(job_id, attempt), **values))
    asked = session.scalar(select(Job.cancel_requested).where(Job.id == job_id))
    return kept, bool(asked)


def finish(session: Session, job_id: str, attempt: int, status: JobStatus, **values: Any) -> bool:
    """running -> ``status``, if this attempt still owns the job. A success is not written
    over a cancel request: cancelling wins until this write."""
    where = list(_owned(job_id, attempt))
    if status == S:
        where.append(Job.cancel_requested.is_(False))
    return bool(
        _move(
            session,
            "finish",
            where,
            status,
            finished_at=utcnow(),
            lease_expires_at=None,
            progress=progress_record("done", 1.0, str(status)),
            **values,
        )
    )


def hand_back(session: Session, job_id: str, attempt: int, why: str) -> bool:
    """running -> queued, as if this attempt had not begun (its attempt number too)."""
    return bool(
        _move(
            session,
            "hand_back",
            _owned(job_id, attempt),
            Q,
            attempt=attempt - 1,
            queued_at=utcnow(),
            lease_expires_at=None,
            progress=progress_record("queued", 0.0, f"re-queued: {why}"),
        )
    )


def note_version(session: Session, job_id: str, version: int) -> None:
    """The version the job recorded (in the same transaction as the version's row)."""
    session.execute(update(Job).where(Job.id == job_id).values(result_version=version))


# The API's transitions -------------------------------------------------------------------


def cancel(session: Session, job_id: str) -> bool:
    """A queued job is cancelled at once; a running one is asked to stop. False if the job
    had finished already."""
    if _move(
        session,
        "cancel",
        (Job.id == job_id,),
        C,
        finished_at=utcnow(),
        progress=progress_record("done", 1.0, "cancelled"),
    ):
        return True
    return bool(_move(session, "ask_cancel", (Job.id == job_id,), cancel_requested=True))


def recover(
    session: Session,
    job_id: str,
    attempt: int,
    now: datetime,
    cancel_requested: bool,
    past_hard_limit: bool,
    max_attempts: int,
) -> JobStatus | None:
    """The sweep's answer to a running job whose lease ran out: cancelled if a cancel was
    asked for, failed past its time limit or its last attempt, else queued again. Returns
    the new status, or None if the row changed meanwhile."""
    if cancel_requested:
        target, values = C, {"finished_at": now}
    elif past_hard_limit:
        message = "the job's worker went silent after its time limit"
        target, values = F, {"finished_at": now, "error": {"code": "timeout", "message": message}}
    elif attempt >= max_attempts:
        message = f"the worker stopped responding on all {attempt} attempts"
        error = {"code": "worker_lost", "message": message}
        target, values = F, {"finished_at": now, "error": error}
    else:
        progress = progress_record("queued", 0.0, "re-queued: worker lost")
        target, values = Q, {"queued_at": now, "progress": progress}
    return target if _move(session, "recover", _owned(job_id, attempt), target, **values) else None


def ring_again(session: Session, job_ids: list[str], now: datetime) -> None:
    """Queued jobs whose message is sent again: their clock starts over."""
    _move(session, "ring_again", (Job.id.in_(job_ids),), queued_at=now)


# Webhook delivery (no change of state) ---------------------------------------------------


def claim_delivery(
    session: Session, job_id: str, due: Iterable[ColumnElement[bool]], until: datetime
) -> bool:
    """Take the job's webhook delivery until ``until`` if it is still ``due``."""
    statement = update(Job).where(Job.id == job_id, *due).values(notify_next_at=until)
    return bool(session.execute(statement).rowcount)


def record_delivery(session: Session, job_id: str, **values: Any) -> None:
    """What came of a webhook delivery: its state, attempts, next try."""
    session.execute(update(Job).where(Job.id == job_id).values(**values))
