"""loracl: continual learning of large language models with LoRA."""

__version__ = "0.1.0"
