"""records_collection_key_idx: listing a collection in byte order (GET /v1/{collection})

The primary key sorts keys by the database's collation (en_US.UTF-8 puts 'a' before 'B');
a listing promises byte order, so it compares ``key COLLATE "C"``, which only an index of
that collation serves as a range scan that stops after the page. A plain ``CREATE INDEX``
works on the plain and on the hash-partitioned table (one index per partition); it holds
flushes (not the API: writes are queued in Redis meanwhile) while it builds. Its name is
the one Postgres gives such an index, as it does to each partition's
(``records_p<i>_collection_key_idx``): every layout has the same shape
(deploy/postgres/hash_partition_records.sql renames it too).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        "CREATE INDEX IF NOT EXISTS records_collection_key_idx "
        'ON records (collection, key COLLATE "C")'
    )


def downgrade() -> None:
    op.execute("DROP INDEX IF EXISTS records_collection_key_idx")
