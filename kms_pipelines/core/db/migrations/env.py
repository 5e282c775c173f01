from alembic import context

from kms_pipelines.core.db.all_models import Base

config = context.config
connection = config.attributes.get("connection")

if connection is None:
    from kms_pipelines.core.db.engine import make_engine

    engine = make_engine(config.get_main_option("sqlalchemy.url"))
    with engine.begin() as connection:
        context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
        context.run_migrations()
else:
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
