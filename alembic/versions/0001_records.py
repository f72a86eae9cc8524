"""records and tombstones

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""

from __future__ import annotations

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE records (
            collection text NOT NULL,
            key text NOT NULL,
            value jsonb NOT NULL,
            version bigint NOT NULL,
            updated_at timestamptz NOT NULL,
            PRIMARY KEY (collection, key)
        )
        """
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
