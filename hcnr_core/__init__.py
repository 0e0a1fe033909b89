"""hcnr_core: Honesty-Critical Neurons Restoration (HCNR) as a pure library.

Tensors and files in, tensors and files out. Never imports the service (api/worker).
"""

__version__ = "0.1.0"

from hcnr_core.config import RepairConfig, RunOptions
from hcnr_core.errors import HCNRError

__all__ = ["HCNRError", "RepairConfig", "RunOptions", "__version__"]
