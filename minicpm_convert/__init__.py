"""minicpm-convert: MiniCPM checkpoints to Llama format, GGUF and INT4, with numerical proof."""

__version__ = "0.1.0"
