"""Tiny Stable-Diffusion-family components (no downloads), from examples/tiny_pipeline.py, which
users run to try the latent path: one builder for the docs' walk, the tests and the benches."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from tiny_pipeline import NAMES, WORDS, captioned_folder, clip_tokenizer, components, save_sd  # noqa: E402

__all__ = ["NAMES", "WORDS", "captioned_folder", "clip_tokenizer", "components", "save_sd"]
