"""The embedded demo model: a tiny trained `qwen3_moe` that ships in the package (see train.py)."""

from pathlib import Path

DEMO_MODEL_PATH = Path(__file__).parent / "model"
