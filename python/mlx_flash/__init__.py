"""mlx-flash: a local LLM server for Apple Silicon and Linux, built on MLX and mlx-lm."""

__version__ = "0.1.0"
