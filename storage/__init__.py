"""Storage: tables, migrations, the engine and every statement leasehold runs.

Knows nothing of Celery or of leases' policy; imports only SQLAlchemy and Alembic.
"""

from storage.database import Database, open_database
from storage.states import ApplyState, ControlAction, ControlState, TaskState

__all__ = ["ApplyState", "ControlAction", "ControlState", "Database", "TaskState", "open_database"]
