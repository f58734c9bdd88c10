"""Request and response bodies of the HTTP API (API.md), separate from the ORM tables: one
module a resource (``models``, ``datasets``, ``jobs``) and what they share (``common``); every
name is importable from ``app.schemas``."""

from app.schemas.common import *  # noqa: F403
from app.schemas.datasets import *  # noqa: F403
from app.schemas.jobs import *  # noqa: F403
from app.schemas.models import *  # noqa: F403
from core.inputs import Input, VersionNumber  # noqa: F401
from core.job_config import AugmentationConfig, ExportFormat, GateConfig, JobConfig  # noqa: F401
