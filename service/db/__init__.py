"""Job database: SQLAlchemy models, migrations (alembic) and the JobStore."""

from service.db.session import Database, upgrade_schema
from service.db.store import (
    DestinationDelivery,
    JobStore,
    JobSummary,
    ReceivedInstance,
    RecordedInstance,
    validity_fields,
)
from service.domain import InstanceSignature

__all__ = [
    "Database",
    "DestinationDelivery",
    "InstanceSignature",
    "JobStore",
    "JobSummary",
    "ReceivedInstance",
    "RecordedInstance",
    "upgrade_schema",
    "validity_fields",
]
