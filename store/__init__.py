"""Persistence shared by the API and the worker: settings, ORM models, repositories,
artifact storage and Alembic migrations. The database is the source of truth."""
