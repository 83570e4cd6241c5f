"""Job database: SQLAlchemy models, migrations (alembic) and the JobStore."""

from service.db.session import Database, upgrade_schema
from service.db.store import (
    DestinationDelivery,
    InstanceSignature,
    JobStore,
    JobSummary,
    validity_fields,
)

__all__ = [
    "Database",
    "DestinationDelivery",
    "InstanceSignature",
    "JobStore",
    "JobSummary",
    "upgrade_schema",
    "validity_fields",
]
