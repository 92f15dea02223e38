"""Shared settings for tests that run the real command line on tiny problems."""

import hashlib
from pathlib import Path

from cmkit.cli import main

TINY_TRAIN = ["--set", "data.n=400", "--set", "data.n_holdout=200", "--set", "train.log_every=1",
              "--batch-size", "32", "--quiet"]
TINY = ["--set", "model.width=32", "--set", "model.depth=1", "--set", "model.emb_dim=16", *TINY_TRAIN]


def cli(*args) -> int:
    return main([str(a) for a in args])


def tree_digest(path: Path) -> dict:
    """{relative path: sha256} of every file under ``path``."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(path).rglob("*")) if p.is_file()}
