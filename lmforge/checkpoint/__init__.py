"""Files in and out: Hugging Face folders, safetensors, GGUF; training state."""

from lmforge.checkpoint.errors import CheckpointError
from lmforge.checkpoint.native import atomic_folder, load, load_weights, save, write_model_folder

__all__ = ["CheckpointError", "atomic_folder", "load", "load_weights", "save", "write_model_folder"]
