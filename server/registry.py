"""The registry: tenants, hashed API keys and adapters, in any SQLAlchemy database (SQLite by default).

Methods are synchronous (SQLAlchemy 2.0 ORM); async callers run them in a worker thread. They return
frozen records detached from any session, and raise the gateway's error types (``TenantExists``,
``AdapterExists``...), never database exceptions.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass, field, replace
from typing import Any

from sqlalchemy import (
    BigInteger,
    ForeignKey,
    Integer,
    String,
    UniqueConstraint,
    create_engine,
    delete,
    event,
    func,
    inspect,
    select,
    update,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from server.errors import AdapterExists, KeyNotFound, TenantExists, TenantNotFound
from server.security import hash_key, key_hint, new_api_key, same_hash

READY = "ready"
DELETING = "deleting"


class Base(DeclarativeBase):
    pass


class TenantRow(Base):
    __tablename__ = "tenants"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    created: Mapped[int] = mapped_column(BigInteger, nullable=False)
    max_concurrency: Mapped[int | None] = mapped_column(Integer, nullable=True)
    tokens_per_minute: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class ApiKeyRow(Base):
    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True, nullable=False)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    created: Mapped[int] = mapped_column(BigInteger, nullable=False)
    # Added after the first release (nullable: rows of older databases have neither; see _add_missing_columns).
    label: Mapped[str | None] = mapped_column(String(64), nullable=True)
    hint: Mapped[str | None] = mapped_column(String(16), nullable=True)


class AdapterRow(Base):
    __tablename__ = "adapters"
    __table_args__ = (UniqueConstraint("tenant_id", "name", name="uq_adapter_tenant_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True, nullable=False)
    name: Mapped[str] = mapped_column(String(64), nullable=False)
    internal_id: Mapped[str] = mapped_column(String(35), unique=True, nullable=False)
    base_model: Mapped[str] = mapped_column(String(256), nullable=False)
    r: Mapped[int] = mapped_column(Integer, nullable=False)
    top_k: Mapped[int] = mapped_column(Integer, nullable=False)
    routing: Mapped[str] = mapped_column(String(16), nullable=False)
    bytes: Mapped[int] = mapped_column(BigInteger, nullable=False)
    sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    created: Mapped[int] = mapped_column(BigInteger, nullable=False)
    state: Mapped[str] = mapped_column(String(16), nullable=False, default=READY)


class TenantDeletionRow(Base):
    """A tenant whose deletion has begun (keys gone, adapters marked deleting): finished at restart if killed."""

    __tablename__ = "tenant_deletions"

    tenant_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    started: Mapped[int] = mapped_column(BigInteger, nullable=False)


@dataclass(frozen=True)
class Tenant:
    id: int
    name: str
    created: int
    max_concurrency: int | None = None
    tokens_per_minute: int | None = None


@dataclass(frozen=True)
class ApiKey:
    """One of a tenant's keys, as listed: never the key itself (only its hash is stored)."""

    id: int
    tenant_id: int
    created: int
    label: str | None = None
    hint: str | None = None
    key_hash: str = field(default="", repr=False)

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "object": "api_key", "created": self.created, "label": self.label, "hint": self.hint}


@dataclass(frozen=True)
class Adapter:
    tenant_id: int
    name: str
    internal_id: str
    base_model: str
    r: int
    top_k: int
    routing: str
    bytes: int
    sha256: str
    created: int
    state: str = READY


def _tenant(row: TenantRow) -> Tenant:
    return Tenant(id=row.id, name=row.name, created=row.created, max_concurrency=row.max_concurrency,
                  tokens_per_minute=row.tokens_per_minute)


def _key(row: ApiKeyRow) -> ApiKey:
    return ApiKey(id=row.id, tenant_id=row.tenant_id, created=row.created, label=row.label, hint=row.hint,
                  key_hash=row.key_hash)


def _adapter(row: AdapterRow) -> Adapter:
    return Adapter(tenant_id=row.tenant_id, name=row.name, internal_id=row.internal_id, base_model=row.base_model,
                   r=row.r, top_k=row.top_k, routing=row.routing, bytes=row.bytes, sha256=row.sha256,
                   created=row.created, state=row.state)


def _switch_to_wal(cur: Any, *, deadline_s: float = 30.0) -> None:
    """Put the SQLite file in WAL mode, waiting for other processes that are doing the same.

    The switch needs the file's exclusive lock, and SQLite answers ``database is locked`` at once rather
    than calling the busy handler (the connection's ``timeout``), so replicas opening a new database
    together would fail. The mode is stored in the file: once any of them has switched, the others' pragma
    is a no-op that takes no lock.
    """
    give_up = time.monotonic() + deadline_s
    pause = 0.005
    while True:
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
            if time.monotonic() >= give_up:
                raise
            time.sleep(pause)
            pause = min(pause * 2, 0.2)


def make_db_engine(url: str) -> Engine:
    """A SQLAlchemy engine (the database connection pool; unrelated to the vLLM engines); SQLite gets WAL, foreign keys and cross-thread use."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            _switch_to_wal(cur)
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


#: Serialises schema set-up between gateway replicas starting at once on one PostgreSQL database.
_SCHEMA_LOCK_ID = 0x466C794C6F5241  # "FlyLoRA"


def create_schema(conn: Connection) -> list[str]:
    """Create missing tables, then add columns newer releases introduced; returns the columns added.

    Migrations are additive only (new nullable columns), so an older database opens as it is and a newer
    gateway never rewrites existing rows. Processes that start together do not race on ``CREATE TABLE`` /
    ``ALTER TABLE``: on PostgreSQL an advisory lock is held for the transaction, on SQLite the write lock.
    """
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_SCHEMA_LOCK_ID})")
    elif conn.dialect.name == "sqlite":
        conn.exec_driver_sql("BEGIN IMMEDIATE")
    Base.metadata.create_all(conn)
    return _add_missing_columns(conn)


def _add_missing_columns(conn: Connection) -> list[str]:
    added = []
    inspector = inspect(conn)
    for table in Base.metadata.sorted_tables:
        present = {c["name"] for c in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name in present:
                continue
            if not column.nullable:
                raise RuntimeError(f"cannot add the required column {table.name}.{column.name} to an existing "
                                   "database: migrations must add nullable columns only")
            kind = column.type.compile(dialect=conn.dialect)
            conn.exec_driver_sql(f'ALTER TABLE {table.name} ADD COLUMN {column.name} {kind}')
            added.append(f"{table.name}.{column.name}")
    return added


class Registry:
    """Tenants, keys and adapters. Create with :meth:`open`; the schema is created if absent."""

    def __init__(self, db: Engine):
        self.db = db  # the SQLAlchemy engine
        self._session = sessionmaker(db, expire_on_commit=False)

    @classmethod
    def open(cls, url: str) -> Registry:
        db = make_db_engine(url)
        with db.begin() as conn:
            create_schema(conn)
        return cls(db)

    def close(self) -> None:
        self.db.dispose()

    # --- tenants ------------------------------------------------------------------------------------------
    def create_tenant(self, name: str, *, max_concurrency: int | None = None,
                      tokens_per_minute: int | None = None) -> tuple[Tenant, str]:
        """A new tenant and its first API key (the key is returned once and stored hashed)."""
        key = new_api_key()
        now = int(time.time())
        with self._session() as s:
            row = TenantRow(name=name, created=now, max_concurrency=max_concurrency,
                            tokens_per_minute=tokens_per_minute)
            s.add(row)
            try:
                s.flush()
                s.add(ApiKeyRow(tenant_id=row.id, key_hash=hash_key(key), created=now, hint=key_hint(key)))
                s.commit()
            except IntegrityError:
                s.rollback()
                raise TenantExists(name) from None
            return _tenant(row), key

    def list_tenants(self) -> list[tuple[Tenant, int]]:
        """Every tenant with its number of adapters, by name."""
        with self._session() as s:
            counts = (select(AdapterRow.tenant_id, func.count().label("n")).group_by(AdapterRow.tenant_id)
                      .subquery())
            rows = s.execute(select(TenantRow, func.coalesce(counts.c.n, 0))
                             .outerjoin(counts, counts.c.tenant_id == TenantRow.id).order_by(TenantRow.name)).all()
            return [(_tenant(t), int(n)) for t, n in rows]

    def get_tenant(self, name: str) -> Tenant:
        with self._session() as s:
            row = s.scalar(select(TenantRow).where(TenantRow.name == name))
            if row is None:
                raise TenantNotFound(name)
            return _tenant(row)

    def add_key(self, tenant_name: str, *, label: str | None = None) -> tuple[ApiKey, str]:
        """A new API key for the tenant (older keys stay valid): its record and the key, returned once."""
        key = new_api_key()
        with self._session() as s:
            tenant_id = self._tenant_id(s, tenant_name)
            row = ApiKeyRow(tenant_id=tenant_id, key_hash=hash_key(key), created=int(time.time()), label=label,
                            hint=key_hint(key))
            s.add(row)
            try:
                s.commit()
            except IntegrityError:
                s.rollback()
                if s.get(TenantRow, tenant_id) is None:  # deleted since it was read
                    raise TenantNotFound(tenant_name) from None
                raise
            return _key(row), key

    def list_keys(self, tenant_name: str) -> list[ApiKey]:
        """The tenant's keys, oldest first."""
        with self._session() as s:
            tenant_id = self._tenant_id(s, tenant_name)
            return [_key(r) for r in s.scalars(select(ApiKeyRow).where(ApiKeyRow.tenant_id == tenant_id)
                                               .order_by(ApiKeyRow.id))]

    def revoke_key(self, tenant_name: str, key_id: int) -> ApiKey:
        """Delete one of the tenant's keys; :class:`KeyNotFound` when the tenant has no key of that id."""
        with self._session() as s:
            tenant_id = self._tenant_id(s, tenant_name)
            row = s.scalar(select(ApiKeyRow).where(ApiKeyRow.id == key_id, ApiKeyRow.tenant_id == tenant_id))
            if row is None:
                raise KeyNotFound(key_id)
            key = _key(row)
            s.execute(delete(ApiKeyRow).where(ApiKeyRow.id == key_id))
            s.commit()
            return key

    def key_hashes(self) -> set[str]:
        """The hash of every key (the gateway's in-memory key directory)."""
        with self._session() as s:
            return set(s.scalars(select(ApiKeyRow.key_hash)))

    @staticmethod
    def _tenant_id(s: Any, name: str) -> int:
        tenant_id = s.scalar(select(TenantRow.id).where(TenantRow.name == name))
        if tenant_id is None:
            raise TenantNotFound(name)
        return tenant_id

    def delete_tenant(self, tenant_id: int) -> None:
        """Remove the tenant, its keys and any adapter rows (the caller removes adapter files first)."""
        with self._session() as s:
            s.execute(delete(AdapterRow).where(AdapterRow.tenant_id == tenant_id))
            s.execute(delete(ApiKeyRow).where(ApiKeyRow.tenant_id == tenant_id))
            s.execute(delete(TenantRow).where(TenantRow.id == tenant_id))
            s.commit()

    def tenant_for_key(self, key: str) -> Tenant | None:
        """The key's tenant, or None. The stored hash is compared in constant time."""
        digest = hash_key(key)
        with self._session() as s:
            found = s.execute(select(ApiKeyRow.key_hash, TenantRow).join(TenantRow, TenantRow.id == ApiKeyRow.tenant_id)
                              .where(ApiKeyRow.key_hash == digest)).first()
            if found is None or not same_hash(found[0], digest):
                return None
            return _tenant(found[1])

    # --- adapters -----------------------------------------------------------------------------------------
    def add_adapter(self, adapter: Adapter) -> Adapter:
        """Register an adapter; :class:`AdapterExists` when the tenant already has that name,
        :class:`TenantNotFound` when the tenant was deleted meanwhile (a foreign key refuses the row)."""
        with self._session() as s:
            s.add(AdapterRow(**{f: getattr(adapter, f) for f in adapter.__dataclass_fields__}))
            try:
                s.commit()
            except IntegrityError:
                s.rollback()
                if s.get(TenantRow, adapter.tenant_id) is None:
                    raise TenantNotFound(str(adapter.tenant_id)) from None
                raise AdapterExists(adapter.name) from None
        return adapter

    def has_adapter_name(self, tenant_id: int, name: str) -> bool:
        """Whether the tenant has an adapter row of that name, in any state."""
        with self._session() as s:
            return s.scalar(select(AdapterRow.id).where(AdapterRow.tenant_id == tenant_id,
                                                        AdapterRow.name == name)) is not None

    def get_adapter(self, tenant_id: int, name: str) -> Adapter | None:
        """The tenant's ready adapter of that name, or None (missing, another tenant's, or being deleted)."""
        with self._session() as s:
            row = s.scalar(select(AdapterRow).where(AdapterRow.tenant_id == tenant_id, AdapterRow.name == name,
                                                    AdapterRow.state == READY))
            return None if row is None else _adapter(row)

    def list_adapters(self, tenant_id: int | None = None, *, state: str | None = READY, after: str | None = None,
                      limit: int | None = None) -> list[Adapter]:
        """The tenant's adapters (every tenant's when ``tenant_id`` is None), by name: those named after
        ``after`` (a page's cursor), at most ``limit`` of them."""
        q = select(AdapterRow).order_by(AdapterRow.name)
        if tenant_id is not None:
            q = q.where(AdapterRow.tenant_id == tenant_id)
        if state is not None:
            q = q.where(AdapterRow.state == state)
        if after is not None:
            q = q.where(AdapterRow.name > after)
        if limit is not None:
            q = q.limit(limit)
        with self._session() as s:
            return [_adapter(r) for r in s.scalars(q)]

    def all_internal_ids(self) -> set[str]:
        with self._session() as s:
            return set(s.scalars(select(AdapterRow.internal_id)))

    def mark_deleting(self, tenant_id: int, name: str) -> Adapter | None:
        """Atomically take a ready adapter out of service; None if there was none to take."""
        with self._session() as s:
            row = s.scalar(select(AdapterRow).where(AdapterRow.tenant_id == tenant_id, AdapterRow.name == name,
                                                    AdapterRow.state == READY))
            if row is None:
                return None
            done = s.execute(update(AdapterRow).where(AdapterRow.id == row.id, AdapterRow.state == READY)
                             .values(state=DELETING))
            s.commit()
            if done.rowcount != 1:  # type: ignore[attr-defined]
                return None
            return replace(_adapter(row), state=DELETING)

    def delete_adapter_row(self, internal_id: str) -> None:
        with self._session() as s:
            s.execute(delete(AdapterRow).where(AdapterRow.internal_id == internal_id))
            s.commit()

    # --- usage and crash-safe deletion (server.adapters) --------------------------------------------------
    def tenant_usage(self, tenant_id: int) -> tuple[int, int]:
        """The tenant's adapter rows (any state: a deleting one still holds its files) and their weight bytes."""
        with self._session() as s:
            n, total = s.execute(select(func.count(), func.coalesce(func.sum(AdapterRow.bytes), 0))
                                 .where(AdapterRow.tenant_id == tenant_id)).one()
            return int(n), int(total)

    def begin_tenant_deletion(self, tenant_id: int) -> None:
        """In one transaction: record the deletion, revoke the tenant's keys, take its adapters out of service.
        From then on nothing of the tenant is usable, and a restart finishes the deletion."""
        with self._session() as s:
            if s.get(TenantDeletionRow, tenant_id) is None:
                s.add(TenantDeletionRow(tenant_id=tenant_id, started=int(time.time())))
            s.execute(delete(ApiKeyRow).where(ApiKeyRow.tenant_id == tenant_id))
            s.execute(update(AdapterRow).where(AdapterRow.tenant_id == tenant_id).values(state=DELETING))
            s.commit()

    def pending_tenant_deletions(self) -> list[int]:
        with self._session() as s:
            return list(s.scalars(select(TenantDeletionRow.tenant_id)))

    def finish_tenant_deletion(self, tenant_id: int) -> bool:
        """Remove the tenant once its adapters are gone (False while some remain: their files may still be in
        use by an engine)."""
        with self._session() as s:
            if s.scalar(select(func.count()).where(AdapterRow.tenant_id == tenant_id)):
                return False
            s.execute(delete(ApiKeyRow).where(ApiKeyRow.tenant_id == tenant_id))
            s.execute(delete(TenantRow).where(TenantRow.id == tenant_id))
            s.execute(delete(TenantDeletionRow).where(TenantDeletionRow.tenant_id == tenant_id))
            s.commit()
            return True
