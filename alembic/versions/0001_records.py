"""records and tombstones

``records`` is a plain table, or with ``wbcache migrate --hash-partitions N`` (the
``hash_partitions`` config attribute) ``PARTITION BY HASH (collection, key)`` into N
partitions ``records_p0`` … ``records_p<N-1>``: the same columns and primary key, so every
statement of the service runs unchanged on either. A later migration that touches
``records`` must work on both (e.g. a plain ``CREATE INDEX`` on a partitioned table builds
one per partition, but ``CONCURRENTLY`` is refused there).

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""

from __future__ import annotations

from alembic import context, op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    n = int(context.config.attributes.get("hash_partitions") or 0)
    op.execute(
        f"""
        CREATE TABLE records (
            collection text NOT NULL,
            key text NOT NULL,
            value jsonb NOT NULL,
            version bigint NOT NULL,
            updated_at timestamptz NOT NULL,
            PRIMARY KEY (collection, key)
        ){" PARTITION BY HASH (collection, key)" if n else ""}
        """
    )
    for i in range(n):
        op.execute(
            f"CREATE TABLE records_p{i} PARTITION OF records "
            f"FOR VALUES WITH (MODULUS {n}, REMAINDER {i})"
        )
    # The version of each key's last delete: guards inserts so that a late or retried
    # flush of an older write cannot bring a deleted key back. Collected after a
    # retention period (TOMBSTONE_RETENTION_DAYS).
    op.execute(
        """
        CREATE TABLE tombstones (
            collection text NOT NULL,
            key text NOT NULL,
            version bigint NOT NULL,
            deleted_at timestamptz NOT NULL,
            PRIMARY KEY (collection, key)
        )
        """
    )
    op.execute("CREATE INDEX tombstones_deleted_at ON tombstones (deleted_at)")


def downgrade() -> None:
    op.execute("DROP TABLE tombstones")
    op.execute("DROP TABLE records")
