from alembic import context

from kms_pipelines.core.foundation.db import all_models  # noqa: F401 - puts every model on Base.metadata
from kms_pipelines.core.foundation.db.models import Base

config = context.config
connection = config.attributes.get("connection")

if connection is None:
    from kms_pipelines.core.foundation.db.engine import make_engine

    url = config.get_main_option("sqlalchemy.url")
    if url is None:
        raise RuntimeError(
            "alembic: no sqlalchemy.url in the configuration (use kms_pipelines.core.foundation.db.upgrade)"
        )
    engine = make_engine(url)
    with engine.begin() as connection:
        context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
        context.run_migrations()
else:
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
