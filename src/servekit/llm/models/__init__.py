"""Model implementations (PyTorch, inference only) and the registry that picks one per architecture."""

from servekit.llm.models.llama import LlamaForCausalLM
from servekit.llm.models.registry import CausalLM, get_model_class, supported_architectures

__all__ = ["CausalLM", "LlamaForCausalLM", "get_model_class", "supported_architectures"]
