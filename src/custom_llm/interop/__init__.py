"""Interchange with the Hugging Face ecosystem: export to and import from Llama, Mistral, Mixtral and
Qwen2-MoE model folders, tokenizer included (see :mod:`.hf`)."""

from .hf import export_hf, import_hf, load_hf_model
from .hf_config import choose_architecture, hf_config_to_model_config, model_config_to_hf_config
from .hf_tokenizer import export_tokenizer, import_tokenizer

__all__ = ["choose_architecture", "export_hf", "export_tokenizer", "hf_config_to_model_config", "import_hf",
           "import_tokenizer", "load_hf_model", "model_config_to_hf_config"]
