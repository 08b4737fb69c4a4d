"""Alembic's environment for the catalog: always handed an open connection
(inside the caller's transaction) by ``storage.migrations.upgrade``."""

from alembic import context

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=None,
                  transaction_per_migration=False, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
