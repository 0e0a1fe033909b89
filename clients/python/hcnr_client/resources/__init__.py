"""The API's resources: files and repair_jobs (sync and async)."""

from hcnr_client.resources.files import AsyncFiles, Files
from hcnr_client.resources.repair_jobs import AsyncRepairJobs, RepairJobs

__all__ = ["AsyncFiles", "AsyncRepairJobs", "Files", "RepairJobs"]
