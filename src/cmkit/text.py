"""Prompts in, per-token embeddings out, with a pipeline's own tokenizer and text encoder (read from
its folder: ``tokenizer/`` and ``text_encoder/``, safetensors only, never downloaded).

    encoder = PromptEncoder.from_folder("sd15")
    text = encoder(["a photo of a sneaker"])      # (1, L, D): the `text` kind of a Condition

Encoding is what diffusers' ``StableDiffusionPipeline.encode_prompt`` does: pad to the tokenizer's
``model_max_length``, truncate longer prompts (with a warning, as diffusers logs one), and take the
encoder's last hidden state. The empty prompt's embedding is the unconditional input of
classifier-free guidance. A prompt is user input: `check_prompt` caps its length and characters
before the tokenizer sees it.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path

import torch
from torch import nn

from .errors import CmkitError, warn
from .safe_io import read_json

MAX_PROMPT_CHARS = 1000  # far above any tokenizer's window (CLIP: 77 tokens); bounds the tokenizer's work
TEXT_ENCODERS = ("CLIPTextModel",)
TOKENIZERS = ("CLIPTokenizer", "CLIPTokenizerFast")
PICKLES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


def check_prompt(prompt) -> str:
    """A user's prompt: a string of at most `MAX_PROMPT_CHARS` characters without control
    characters (C0, DEL, C1) or unpaired surrogates; line breaks and tabs become spaces. Format
    characters (ZWJ in emoji, ZWNJ in Persian, the soft hyphen) and code points newer than this
    Python's Unicode table are text and stay. Raises ValueError with a one-line reason."""
    if not isinstance(prompt, str):
        raise ValueError(f"a prompt must be text, got {type(prompt).__name__}")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ValueError(f"a prompt may have at most {MAX_PROMPT_CHARS} characters, got {len(prompt)}")
    prompt = prompt.replace("\r", " ").replace("\n", " ").replace("\t", " ")
    bad = next((c for c in prompt if unicodedata.category(c) in ("Cc", "Cs")), None)
    if bad is not None:
        kind = "an unpaired surrogate" if unicodedata.category(bad) == "Cs" else "a control character"
        raise ValueError(f"a prompt may not contain {kind} (U+{ord(bad):04X})")
    return prompt


def refuse_pickles(folder: Path, weights: str) -> None:
    """Refuse a component folder whose weights are pickles only (cmkit never unpickles files)."""
    if (folder / weights).is_file() or any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLES) if folder.is_dir() else []
    if pickles:
        raise CmkitError(f"{folder} has only pickled weights ({pickles[0]}); cmkit never unpickles them: convert "
                         "once with save_pretrained(..., safe_serialization=True)")
    raise CmkitError(f"{folder} has no {weights}")


class PromptEncoder(nn.Module):
    """A frozen tokenizer and text encoder: ``encoder(prompts)`` is (n, L, D) float32."""

    def __init__(self, tokenizer, text_encoder: nn.Module):
        super().__init__()
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.eval().requires_grad_(False)

    @classmethod
    def from_folder(cls, folder: str | Path) -> "PromptEncoder":
        """The ``tokenizer/`` and ``text_encoder/`` of a pipeline (or run) folder."""
        from transformers import AutoTokenizer, CLIPTextModel
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # cmkit reports its own progress; a bar per load is noise

        folder = Path(folder)
        for sub in ("tokenizer", "text_encoder"):
            if not (folder / sub).is_dir():
                raise CmkitError(f"{folder} has no {sub}/ folder: a text-conditioned pipeline needs its tokenizer and "
                                 "text encoder")
        config = read_json(folder / "text_encoder" / "config.json", "text encoder config")
        arch = (config.get("architectures") or [None])[0] if isinstance(config, dict) else None
        if arch not in TEXT_ENCODERS:
            raise CmkitError(f"{folder}/text_encoder holds a {arch!r}; cmkit reads {', '.join(TEXT_ENCODERS)}")
        refuse_pickles(folder / "text_encoder", "model.safetensors")
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(folder / "tokenizer"), local_files_only=True)
            encoder = CLIPTextModel.from_pretrained(str(folder / "text_encoder"), use_safetensors=True,
                                                    local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CmkitError(f"cannot load the tokenizer and text encoder in {folder}: {str(e).splitlines()[0]}") \
                from None
        if type(tokenizer).__name__ not in TOKENIZERS:
            raise CmkitError(f"{folder}/tokenizer holds a {type(tokenizer).__name__}; cmkit reads {', '.join(TOKENIZERS)}")
        return cls(tokenizer, encoder.float())

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        self.tokenizer.save_pretrained(str(folder / "tokenizer"))
        self.text_encoder.save_pretrained(str(folder / "text_encoder"), safe_serialization=True)

    @property
    def max_length(self) -> int:
        return int(self.tokenizer.model_max_length)

    @property
    def shape(self) -> tuple[int, int]:
        """(L, D): tokens per prompt and the embedding width."""
        return self.max_length, int(self.text_encoder.config.hidden_size)

    def token_ids(self, prompts: list[str], warn_truncated: bool = True) -> torch.Tensor:
        """(n, L) token ids, padded and truncated as the pipelines do; warns about what was cut."""
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=self.max_length, truncation=True,
                             return_tensors="pt").input_ids
        if not warn_truncated:
            return ids
        whole = self.tokenizer(list(prompts), padding="longest", return_tensors="pt").input_ids
        if whole.shape[-1] > ids.shape[-1]:
            longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
            warn(f"a prompt is longer than the tokenizer's {self.max_length} tokens and was truncated "
                 f"({prompts[longest][:60]!r}...)")
        return ids

    @torch.no_grad()
    def forward(self, prompts: list[str], batch_size: int = 256, warn_truncated: bool = True) -> torch.Tensor:
        device = next(self.text_encoder.parameters()).device
        ids = self.token_ids(prompts, warn_truncated).to(device)
        out = []
        for part in ids.split(batch_size):
            mask = None
            if getattr(self.text_encoder.config, "use_attention_mask", False):
                mask = (part != self.tokenizer.pad_token_id).long()
            out.append(self.text_encoder(part, attention_mask=mask)[0].float())
        return torch.cat(out)

    def null(self) -> torch.Tensor:
        """(1, L, D): the empty prompt, the unconditional input of classifier-free guidance."""
        return self([""])
