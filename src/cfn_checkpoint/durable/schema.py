"""The durable schema as an ordered list of migrations; a migration's version is its index + 1.

The same statements serve SQLite and PostgreSQL: only portable types and syntax.
Each backend fills in three types: ``{autoinc}`` (its auto-increment primary key),
``{blob}`` (bytes) and ``{real}`` (a 64-bit float: ``REAL`` on SQLite, ``DOUBLE
PRECISION`` on PostgreSQL, whose ``REAL`` has 32 bits and would not give back the
value stored).
"""

from __future__ import annotations

#: Tables holding per-task durable rows (each has ``id`` and ``task_id``), in restore order.
TASK_TABLES: tuple[str, ...] = ("task_results", "agent_metrics", "audit_trail")
#: The global table a checkpoint references rather than copies.
SKILL_TABLE = "skill_metadata"

MIGRATIONS: list[list[str]] = [
    [
        """CREATE TABLE task_results (
            id {autoinc},
            task_id TEXT NOT NULL,
            agent_id TEXT,
            result TEXT,
            confidence {real},
            created_at TEXT NOT NULL
        )""",
        "CREATE INDEX ix_task_results_task ON task_results (task_id, id)",
        """CREATE TABLE agent_metrics (
            id {autoinc},
            task_id TEXT NOT NULL,
            agent_id TEXT NOT NULL,
            metric TEXT NOT NULL,
            value {real},
            recorded_at TEXT NOT NULL
        )""",
        "CREATE INDEX ix_agent_metrics_task ON agent_metrics (task_id, id)",
        """CREATE TABLE audit_trail (
            id {autoinc},
            task_id TEXT NOT NULL,
            agent_id TEXT,
            event TEXT NOT NULL,
            details TEXT,
            created_at TEXT NOT NULL
        )""",
        "CREATE INDEX ix_audit_trail_task ON audit_trail (task_id, id)",
        """CREATE TABLE skill_metadata (
            skill_id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            version TEXT,
            metadata TEXT,
            updated_at TEXT NOT NULL
        )""",
        """CREATE TABLE checkpoints (
            seq {autoinc},
            checkpoint_id TEXT NOT NULL UNIQUE,
            task_id TEXT NOT NULL,
            trigger TEXT NOT NULL,
            status TEXT NOT NULL,
            state_hash TEXT NOT NULL,
            runtime_state_hash TEXT NOT NULL,
            durable_state_hash TEXT NOT NULL,
            created_at TEXT NOT NULL,
            completed_at TEXT,
            error TEXT,
            metadata TEXT NOT NULL,
            key_count INTEGER NOT NULL,
            row_count INTEGER NOT NULL,
            raw_bytes BIGINT NOT NULL,
            stored_bytes BIGINT NOT NULL,
            point_in_time INTEGER NOT NULL,
            format_version INTEGER NOT NULL,
            redis_version TEXT NOT NULL,
            last_recovered_at TEXT,
            recovery_count INTEGER NOT NULL DEFAULT 0
        )""",
        "CREATE INDEX ix_checkpoints_task ON checkpoints (task_id, seq)",
        "CREATE INDEX ix_checkpoints_status ON checkpoints (status)",
        """CREATE TABLE payloads (
            digest TEXT PRIMARY KEY,
            raw_size BIGINT NOT NULL,
            stored_size BIGINT NOT NULL,
            data {blob} NOT NULL
        )""",
        """CREATE TABLE checkpoint_payloads (
            checkpoint_id TEXT NOT NULL,
            ordinal INTEGER NOT NULL,
            kind TEXT NOT NULL,
            digest TEXT NOT NULL,
            PRIMARY KEY (checkpoint_id, ordinal)
        )""",
        "CREATE INDEX ix_checkpoint_payloads_digest ON checkpoint_payloads (digest)",
        """CREATE TABLE recoveries (
            id {autoinc},
            checkpoint_id TEXT NOT NULL,
            task_id TEXT NOT NULL,
            started_at TEXT NOT NULL,
            recovered_at TEXT,
            status TEXT NOT NULL,
            runtime_restored INTEGER NOT NULL,
            durable_restored INTEGER NOT NULL,
            keys_restored INTEGER NOT NULL,
            rows_restored INTEGER NOT NULL,
            notes TEXT
        )""",
        "CREATE INDEX ix_recoveries_task ON recoveries (task_id, status)",
    ],
]

#: The version a fully migrated database has.
SCHEMA_VERSION = len(MIGRATIONS)
