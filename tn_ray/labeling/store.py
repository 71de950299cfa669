"""Durable answers and per-annotator queues in SQLite.

WAL journal with ``synchronous=FULL`` and one transaction per answer: when the server has replied,
the answer is on disk, so a killed server or a closed tab loses nothing. Queue choices run in
``BEGIN IMMEDIATE`` transactions (one writer at a time), so two annotators asking at once never
take the same last slot, and an (item, annotator) pair is a primary key: nobody is shown an item
twice and nobody overwrites anyone else's answer (an annotator's relabel replaces only their own;
every answer is also appended to ``events``).

Each item is offered to ``per_item`` annotators. A slot counts while answered, or while assigned
and younger than ``lease_s``; an annotator who walks away frees the slot after the lease.
"""
from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
from pathlib import Path

from tn_ray.errors import InputError
from tn_ray.labeling.security import secret_hash
from tn_ray.labeling.tasks import Task

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS annotators(name TEXT PRIMARY KEY, secret_hash TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS assignments(item_id TEXT NOT NULL, annotator TEXT NOT NULL, seq INTEGER NOT NULL,
    assigned_at REAL NOT NULL, PRIMARY KEY(item_id, annotator));
CREATE TABLE IF NOT EXISTS answers(item_id TEXT NOT NULL, annotator TEXT NOT NULL, value TEXT NOT NULL,
    first_at REAL NOT NULL, updated_at REAL NOT NULL, PRIMARY KEY(item_id, annotator));
CREATE TABLE IF NOT EXISTS events(id INTEGER PRIMARY KEY AUTOINCREMENT, item_id TEXT NOT NULL,
    annotator TEXT NOT NULL, value TEXT NOT NULL, at REAL NOT NULL);
"""
NAME_RE = re.compile(r"^[\w .@-]{1,64}$")


class Forbidden(PermissionError):
    """An annotator asked for something that is not theirs (another name, an item not assigned)."""


SQLITE_HEADER = b"SQLite format 3\x00"


def check_answer_db(path: str | Path) -> None:
    """A path that is absent, empty or a tn-ray answer database; anything else (a folder, a file that
    is not SQLite, a SQLite database of something else) is an :class:`InputError` naming it, found
    before the file is opened for writing (so it is never changed)."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"--db {path}: is a folder, not an answer database (SQLite file)")
    if not path.is_file() or path.stat().st_size == 0:
        return
    with path.open("rb") as f:
        head = f.read(len(SQLITE_HEADER))
    if head != SQLITE_HEADER:
        raise InputError(f"--db {path}: not an answer database (not a SQLite file); give a new path or the .sqlite "
                         "file this task wrote")
    try:
        with sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True) as db:
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.DatabaseError as err:
        raise InputError(f"--db {path}: not a readable SQLite database ({err})") from None
    if tables and not {"meta", "answers"} <= tables:
        raise InputError(f"--db {path}: a SQLite database of something else (tables {sorted(tables)[:5]}), not a "
                         "tn-ray "
                         "answer database; give another --db")


class AnswerStore:
    def __init__(self, path: str | Path, task: Task, per_item: int = 3, lease_s: float = 1800.0):
        self.path, self.task, self.per_item, self.lease_s = Path(path), task, per_item, lease_s
        check_answer_db(self.path)
        self._local = threading.local()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = self._db()
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(SCHEMA)
        with self._write() as db:
            rows = dict(db.execute("SELECT key, value FROM meta").fetchall())
            mine = {"kind": task.kind, "fingerprint": task.fingerprint()}
            if rows and rows.get("fingerprint") != mine["fingerprint"]:
                raise InputError(f"{self.path}: this answer database belongs to another {rows.get('kind')} task "
                                 f"(fingerprint {rows.get('fingerprint')}, this task's is {mine['fingerprint']}); use "
                                 "another --db")
            db.executemany("INSERT OR IGNORE INTO meta VALUES (?, ?)", mine.items())
        self.index = {item.item_id: i for i, item in enumerate(task.items)}

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA busy_timeout=30000")
            self._local.db = db
        return db

    class _Txn:
        def __init__(self, db):
            self.db = db

        def __enter__(self):
            self.db.execute("BEGIN IMMEDIATE")
            return self.db

        def __exit__(self, exc_type, *_):
            self.db.execute("ROLLBACK" if exc_type else "COMMIT")

    def _write(self) -> _Txn:
        return self._Txn(self._db())

    # annotators ---------------------------------------------------------------------------------
    def login(self, name: str, secret: str | None) -> tuple[str, bool]:
        """(secret, created): a new name gets a fresh secret; a known name needs its secret."""
        import secrets

        if not NAME_RE.match(name or ""):
            raise ValueError("annotator name: 1-64 letters, digits, spaces, '.', '@', '_' or '-'")
        with self._write() as db:
            row = db.execute("SELECT secret_hash FROM annotators WHERE name = ?", (name,)).fetchone()
            if row is None:
                secret = secrets.token_urlsafe(18)
                db.execute("INSERT INTO annotators VALUES (?, ?, ?)", (name, secret_hash(secret), time.time()))
                return secret, True
        if secret is None or secret_hash(secret) != row[0]:
            raise Forbidden(f"the name {name!r} is taken; continue from the browser that started it")
        return secret, False

    def check(self, name: str, secret: str | None) -> None:
        row = self._db().execute("SELECT secret_hash FROM annotators WHERE name = ?", (name,)).fetchone()
        if row is None or secret is None or secret_hash(secret) != row[0]:
            raise Forbidden("unknown annotator or wrong session; start again from the first page")

    # queues -------------------------------------------------------------------------------------
    def sequence(self, annotator: str) -> list[str]:
        rows = self._db().execute("SELECT item_id FROM assignments WHERE annotator = ? ORDER BY seq", (annotator,))
        return [r[0] for r in rows]

    def _taken(self, db, now: float) -> dict[str, int]:
        rows = db.execute(
            "SELECT a.item_id, COUNT(*) FROM assignments a LEFT JOIN answers w "
            "ON w.item_id = a.item_id AND w.annotator = a.annotator "
            "WHERE w.item_id IS NOT NULL OR a.assigned_at > ? GROUP BY a.item_id", (now - self.lease_s,))
        return dict(rows.fetchall())

    def _open_items(self, db, annotator: str, now: float) -> list[str]:
        mine = set(self.sequence(annotator))
        taken = self._taken(db, now)
        return [i.item_id for i in self.task.items if i.item_id not in mine and taken.get(i.item_id, 0) < self.per_item]

    def assign_next(self, annotator: str) -> str | None:
        """The annotator's first unanswered item, else a newly assigned one, else None (done)."""
        with self._write() as db:
            row = db.execute("SELECT a.item_id FROM assignments a LEFT JOIN answers w ON w.item_id = a.item_id "
                             "AND w.annotator = a.annotator WHERE a.annotator = ? AND w.item_id IS NULL "
                             "ORDER BY a.seq LIMIT 1", (annotator,)).fetchone()
            if row:
                return row[0]
            now = time.time()
            free = self._open_items(db, annotator, now)
            if not free:
                return None
            seq = db.execute(
                "SELECT COALESCE(MAX(seq), -1) + 1 FROM assignments WHERE annotator = ?", (annotator,)
            ).fetchone()[0]
            db.execute("INSERT INTO assignments VALUES (?, ?, ?, ?)", (free[0], annotator, seq, now))
            return free[0]

    def answer(self, annotator: str, item_id: str, value) -> None:
        """Store (or replace) the annotator's own answer to an item assigned to them; durable on return."""
        text, now = json.dumps(value), time.time()
        with self._write() as db:
            if not db.execute(
                "SELECT 1 FROM assignments WHERE item_id = ? AND annotator = ?", (item_id, annotator)
            ).fetchone():
                raise Forbidden(f"item {item_id!r} is not assigned to {annotator!r}")
            db.execute(
                "INSERT INTO answers VALUES (?, ?, ?, ?, ?) ON CONFLICT(item_id, annotator) "
                "DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
                (item_id, annotator, text, now, now),
            )
            db.execute(
                "INSERT INTO events(item_id, annotator, value, at) VALUES (?, ?, ?, ?)", (item_id, annotator, text, now)
            )

    def own_answers(self, annotator: str) -> dict[str, object]:
        rows = self._db().execute("SELECT item_id, value FROM answers WHERE annotator = ?", (annotator,))
        return {i: json.loads(v) for i, v in rows}

    def progress(self, annotator: str) -> dict:
        """done / total for one annotator: total = their items + items still open to them."""
        db = self._db()
        done = db.execute("SELECT COUNT(*) FROM answers WHERE annotator = ?", (annotator,)).fetchone()[0]
        assigned = len(self.sequence(annotator))
        return {"done": done, "total": assigned + len(self._open_items(db, annotator, time.time()))}

    # read-out (command line only; never served) -----------------------------------------------
    def all_answers(self) -> list[dict]:
        """Every current answer, earliest first: item_id, annotator, value, first_at, updated_at."""
        rows = self._db().execute(
            "SELECT item_id, annotator, value, first_at, updated_at FROM answers ORDER BY first_at, annotator"
        )
        return [
            {"item_id": i, "annotator": a, "value": json.loads(v), "first_at": f, "updated_at": u}
            for i, a, v, f, u in rows
        ]


def open_answers(path: str | Path, task: Task) -> list[dict]:
    """All answers of an existing database (refusing a database of another task)."""
    if not Path(path).is_file():
        raise InputError(f"{path}: answer database not found")
    return AnswerStore(path, task).all_answers()
