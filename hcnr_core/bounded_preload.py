"""Imported once by the validation forkserver (`hcnr_core.bounded`): every child forked
from it starts with torch, transformers and the methods imported."""

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401
from transformers.models.llama import modeling_llama  # noqa: F401  # the toy's architecture

import hcnr_core.methods
import hcnr_core.pipeline  # noqa: F401
