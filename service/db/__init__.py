"""Job database: SQLAlchemy models, migrations (alembic) and the JobStore."""

from service.db.session import Database, upgrade_schema
from service.db.store import InstanceSignature, JobStore, JobSummary

__all__ = ["Database", "InstanceSignature", "JobStore", "JobSummary", "upgrade_schema"]
