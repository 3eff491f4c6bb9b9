"""Quality windows in the registry database, so that every gateway replica reads and writes the same ones.

Two tables next to the registry's (same database, created if absent):

- ``quality_samples``: one row per finished request (its mean energy, max prob, entropy, tokens), by
  ``subject``; only the newest ``2 N`` rows of a subject are kept (pruned back to ``N``).
- ``quality_subjects``: one row per subject: tenant and model name (for labels), how many requests it has
  seen, the reference window (a JSON list of ``N`` energies: the first ``N``, set once by whichever replica
  first sees ``N``, or pinned by the tenant), the calibration, and the last computed summary (what
  ``/metrics`` exports, so each replica's scrape is one small query).

A subject is an adapter's internal id (``fl-...``), or ``base:<tenant id>`` for a tenant's base-model
requests (each tenant has its own: nothing about one tenant's traffic reaches another). The window is the
newest ``N`` rows by insertion id, whichever replica inserted them. Methods are synchronous (run them in a
worker thread) and never raise database errors for absent rows.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import BigInteger, Float, Integer, String, Text, delete, func, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from server.quality import Calibration, Sample, summarize

ROW_ID = BigInteger().with_variant(Integer, "sqlite")  # SQLite autoincrements INTEGER PRIMARY KEY only


class QualityBase(DeclarativeBase):
    pass


class SampleRow(QualityBase):
    __tablename__ = "quality_samples"

    id: Mapped[int] = mapped_column(ROW_ID, primary_key=True, autoincrement=True)
    subject: Mapped[str] = mapped_column(String(72), index=True, nullable=False)
    energy: Mapped[float] = mapped_column(Float, nullable=False)
    max_prob: Mapped[float | None] = mapped_column(Float, nullable=True)
    entropy: Mapped[float | None] = mapped_column(Float, nullable=True)
    tokens: Mapped[int] = mapped_column(Integer, nullable=False)
    created: Mapped[int] = mapped_column(BigInteger, nullable=False)


class SubjectRow(QualityBase):
    __tablename__ = "quality_subjects"

    subject: Mapped[str] = mapped_column(String(72), primary_key=True)
    tenant_id: Mapped[int] = mapped_column(Integer, index=True, nullable=False)
    tenant_name: Mapped[str] = mapped_column(String(64), nullable=False)
    model: Mapped[str] = mapped_column(String(256), nullable=False)
    observed: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    reference: Mapped[str | None] = mapped_column(Text, nullable=True)
    reference_source: Mapped[str | None] = mapped_column(String(16), nullable=True)
    calibration: Mapped[str | None] = mapped_column(Text, nullable=True)
    summary: Mapped[str | None] = mapped_column(Text, nullable=True)
    updated: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)


def base_subject(tenant_id: int) -> str:
    return f"base:{tenant_id}"


@dataclass(frozen=True)
class Observation:
    """A finished request's energies, for one subject."""

    subject: str
    tenant_id: int
    tenant_name: str
    model: str
    sample: Sample


@dataclass(frozen=True)
class SubjectSummary:
    subject: str
    tenant_name: str
    model: str
    summary: dict[str, Any]


class QualityStore:
    """The two tables on the registry's database engine."""

    def __init__(self, engine: Engine, window_size: int):
        if window_size < 2:
            raise ValueError(f"the quality window needs at least 2 requests, got {window_size}")
        self.engine = engine
        self.window_size = window_size
        self._session = sessionmaker(engine, expire_on_commit=False)
        QualityBase.metadata.create_all(engine)

    # --- writes (the recorder) ------------------------------------------------------------------------
    def append(self, observations: Sequence[Observation]) -> list[str]:
        """Insert the samples, set first-N references, prune, refresh summaries; returns the subjects."""
        by_subject: dict[str, list[Observation]] = {}
        for o in observations:
            by_subject.setdefault(o.subject, []).append(o)
        now = int(time.time())
        with self._session() as s:
            for subject, obs in by_subject.items():
                s.add_all(SampleRow(subject=subject, energy=o.sample.energy, max_prob=o.sample.max_prob,
                                    entropy=o.sample.entropy, tokens=o.sample.tokens, created=now) for o in obs)
                done = s.execute(update(SubjectRow).where(SubjectRow.subject == subject)
                                 .values(observed=SubjectRow.observed + len(obs), updated=now))
                if done.rowcount == 0:  # type: ignore[attr-defined]
                    first = obs[0]
                    try:
                        with s.begin_nested():
                            s.add(SubjectRow(subject=subject, tenant_id=first.tenant_id,
                                             tenant_name=first.tenant_name, model=first.model,
                                             observed=len(obs), updated=now))
                    except IntegrityError:  # another replica created it meanwhile
                        s.execute(update(SubjectRow).where(SubjectRow.subject == subject)
                                  .values(observed=SubjectRow.observed + len(obs), updated=now))
            s.flush()
            for subject in by_subject:
                self._set_first_reference(s, subject)
                self._prune(s, subject)
                self._refresh_summary(s, subject)
            s.commit()
        return list(by_subject)

    def _set_first_reference(self, s, subject: str) -> None:
        row = s.get(SubjectRow, subject)
        if row is None or row.reference is not None:
            return
        first = s.scalars(select(SampleRow.energy).where(SampleRow.subject == subject).order_by(SampleRow.id)
                          .limit(self.window_size)).all()
        if len(first) == self.window_size:
            s.execute(update(SubjectRow).where(SubjectRow.subject == subject, SubjectRow.reference.is_(None))
                      .values(reference=json.dumps(first), reference_source="first"))

    def _prune(self, s, subject: str) -> None:
        count = s.scalar(select(func.count()).select_from(SampleRow).where(SampleRow.subject == subject))
        if count is None or count <= 2 * self.window_size:
            return
        oldest_kept = s.scalar(select(SampleRow.id).where(SampleRow.subject == subject)
                               .order_by(SampleRow.id.desc()).offset(self.window_size - 1).limit(1))
        s.execute(delete(SampleRow).where(SampleRow.subject == subject, SampleRow.id < oldest_kept))

    def _refresh_summary(self, s, subject: str) -> dict[str, Any] | None:
        row = s.get(SubjectRow, subject, populate_existing=True)
        if row is None:
            return None
        summary = self._summary(s, row)
        row.summary = json.dumps(summary)
        return summary

    def _window(self, s, subject: str) -> list[Sample]:
        rows = s.execute(select(SampleRow.energy, SampleRow.max_prob, SampleRow.entropy, SampleRow.tokens)
                         .where(SampleRow.subject == subject).order_by(SampleRow.id.desc())
                         .limit(self.window_size)).all()
        return [Sample(*r) for r in reversed(rows)]

    def _summary(self, s, row: SubjectRow) -> dict[str, Any]:
        return summarize(self._window(s, row.subject), self.window_size, observed=row.observed,
                         reference=json.loads(row.reference) if row.reference else None,
                         reference_source=row.reference_source,
                         calibration=Calibration.from_json(json.loads(row.calibration)) if row.calibration else None)

    # --- reads and tenant actions (the API) -------------------------------------------------------------
    def summary(self, subject: str) -> dict[str, Any]:
        """Fresh figures of a subject (an empty window if it has seen no request yet)."""
        with self._session() as s:
            row = s.get(SubjectRow, subject)
            if row is None:
                return summarize([], self.window_size, observed=0, reference=None, reference_source=None,
                                 calibration=None)
            return self._summary(s, row)

    def window_energies(self, subject: str) -> list[float]:
        with self._session() as s:
            return [x.energy for x in self._window(s, subject)]

    def pin_reference(self, subject: str, energies: Sequence[float]) -> None:
        """Make ``energies`` (a full window) the subject's reference."""
        with self._session() as s:
            s.execute(update(SubjectRow).where(SubjectRow.subject == subject)
                      .values(reference=json.dumps(list(energies)), reference_source="pinned",
                              updated=int(time.time())))
            self._refresh_summary(s, subject)
            s.commit()

    def set_calibration(self, subject: str, tenant_id: int, tenant_name: str, model: str,
                        calibration: Calibration) -> None:
        with self._session() as s:
            row = s.get(SubjectRow, subject)
            if row is None:
                row = SubjectRow(subject=subject, tenant_id=tenant_id, tenant_name=tenant_name, model=model,
                                 observed=0, updated=int(time.time()))
                s.add(row)
            row.calibration = json.dumps(calibration.to_json())
            s.flush()
            self._refresh_summary(s, subject)
            s.commit()

    def summaries(self) -> list[SubjectSummary]:
        """Every subject's last computed summary (what ``/metrics`` exports)."""
        with self._session() as s:
            rows = s.execute(select(SubjectRow.subject, SubjectRow.tenant_name, SubjectRow.model,
                                    SubjectRow.summary).where(SubjectRow.summary.is_not(None))).all()
        return [SubjectSummary(r[0], r[1], r[2], json.loads(r[3])) for r in rows]

    def forget(self, subjects: Iterable[str]) -> int:
        """Remove subjects and their samples (deleted adapters and tenants)."""
        subjects = list(subjects)
        with self._session() as s:
            for i in range(0, len(subjects), 500):
                part = subjects[i:i + 500]
                s.execute(delete(SampleRow).where(SampleRow.subject.in_(part)))
                s.execute(delete(SubjectRow).where(SubjectRow.subject.in_(part)))
            s.commit()
        return len(subjects)

    def subjects(self) -> list[tuple[str, int]]:
        with self._session() as s:
            return [(r[0], r[1]) for r in s.execute(select(SubjectRow.subject, SubjectRow.tenant_id)).all()]
