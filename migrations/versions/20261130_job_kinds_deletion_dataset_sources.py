"""job kinds (evaluations), version deletion, datasets by reference

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30 00:45:00.000000

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa

import core.db  # noqa: F401  (custom column types)


# revision identifiers, used by Alembic.
revision: str = '0004'
down_revision: Union[str, Sequence[str], None] = '0003'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('kind', sa.String(length=16), server_default='expand', nullable=False))

    with op.batch_alter_table('model_versions', schema=None) as batch_op:
        batch_op.add_column(sa.Column('deleted_at', core.db.UTCDateTime(timezone=True), nullable=True))

    with op.batch_alter_table('datasets', schema=None) as batch_op:
        batch_op.add_column(sa.Column('status', sa.String(length=16), server_default='ready', nullable=False))
        batch_op.add_column(sa.Column('source', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('progress', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('error', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('lease_expires_at', core.db.UTCDateTime(timezone=True), nullable=True))


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table('datasets', schema=None) as batch_op:
        batch_op.drop_column('lease_expires_at')
        batch_op.drop_column('error')
        batch_op.drop_column('progress')
        batch_op.drop_column('source')
        batch_op.drop_column('status')

    with op.batch_alter_table('model_versions', schema=None) as batch_op:
        batch_op.drop_column('deleted_at')

    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('kind')
