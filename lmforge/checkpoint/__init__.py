"""Files in and out: Hugging Face folders, safetensors, GGUF; training state."""

from lmforge.checkpoint.atomic import atomic_file, atomic_folder, write_text_atomic
from lmforge.checkpoint.errors import CheckpointError
from lmforge.checkpoint.native import load, load_weights, save, write_model_folder

__all__ = ["CheckpointError", "atomic_file", "atomic_folder", "write_text_atomic", "load", "load_weights", "save", "write_model_folder"]
