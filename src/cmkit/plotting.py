"""Figures (matplotlib, headless). matplotlib loads on the first figure, not with cmkit."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def pyplot():
    """matplotlib.pyplot with the headless backend (imported on first use)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def scatter_panels(panels: list[tuple[str, np.ndarray]], path: str | Path, limits=None,
                   caption: str | None = None) -> None:
    """Side-by-side scatter plots of 2-D point sets sharing axes, written to ``path``, with an
    optional ``caption`` under them."""
    if limits is None:
        allpts = np.concatenate([p for _, p in panels])
        lo, hi = np.percentile(allpts, 0.5, axis=0), np.percentile(allpts, 99.5, axis=0)
        pad = 0.1 * (hi - lo)
        limits = (lo - pad, hi + pad)
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4), squeeze=False)
    for ax, (title, pts) in zip(axes[0], panels):
        ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.4, linewidths=0)
        ax.set_title(title, fontsize=9)
        ax.set_xlim(limits[0][0], limits[1][0])
        ax.set_ylim(limits[0][1], limits[1][1])
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    if caption:  # just under the first panel (equal aspect leaves the figure's own bottom far below)
        axes[0][0].text(0, -0.06, caption, transform=axes[0][0].transAxes, fontsize=8.5, va="top", ha="left")
    tmp = Path(path).with_name(Path(path).name + ".tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)


def image_grid(images: np.ndarray, nrow: int | None = None, padding: int = 2) -> np.ndarray:
    """Tile uint8 images (N, C, H, W) into one (H', W', C) array, ``nrow`` per row (default
    about sqrt(N)), with ``padding`` black pixels between them."""
    n, c, h, w = images.shape
    nrow = nrow or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / nrow))
    grid = np.zeros((c, rows * (h + padding) + padding, nrow * (w + padding) + padding), dtype=np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, top:top + h, left:left + w] = img
    return grid.transpose(1, 2, 0)


MIN_GRID_WIDTH = 512  # pixels: small images (8x8 digits) are enlarged, nearest-neighbour, to be seen
CAPTION_FONT_SIZE = 14


def _with_caption(picture, title: str):
    """``picture`` below a white strip holding ``title`` (Pillow's bundled font, wrapped)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=CAPTION_FONT_SIZE)
    words, lines = title.split(), [""]
    for word in words:
        trial = f"{lines[-1]} {word}".strip()
        if font.getlength(trial) > picture.width - 8 and lines[-1]:
            lines.append(word)
        else:
            lines[-1] = trial
    line_height = CAPTION_FONT_SIZE + 4
    strip = 6 + line_height * len(lines)
    canvas = Image.new(picture.mode, (picture.width, picture.height + strip), "white")
    canvas.paste(picture, (0, strip))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((4, 3 + i * line_height), line, fill="black", font=font)
    return canvas


def save_image_grid(images: np.ndarray, path: str | Path, nrow: int | None = None, scale: int | None = None,
                    title: str | None = None) -> None:
    """Write a PNG grid of uint8 images (N, C, H, W), under a caption ``title`` if given. Small
    images are enlarged (nearest) so that the grid is at least MIN_GRID_WIDTH pixels wide.
    Written atomically."""
    from PIL import Image

    grid = image_grid(images, nrow)
    scale = scale or max(1, -(-MIN_GRID_WIDTH // grid.shape[1]))
    picture = Image.fromarray(grid[..., 0] if grid.shape[2] == 1 else grid)
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    if title:
        picture = _with_caption(picture, title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    picture.save(tmp)
    tmp.replace(path)


MASK_TINT = (255, 40, 40)  # the region an inpainting fills, drawn on its input


def tint_masked(images: np.ndarray, masks: np.ndarray, weight: float = 0.5) -> np.ndarray:
    """uint8 RGB (N, 3, H, W) copies of ``images`` with the pixels where ``masks`` (bool (H, W) or
    (N, H, W)) is set blended towards MASK_TINT: an inpainting input with its hole shown."""
    rgb = np.repeat(images, 3, axis=1) if images.shape[1] == 1 else images.copy()
    masks = np.broadcast_to(np.asarray(masks, bool), (len(rgb), *rgb.shape[2:]))
    tint = np.array(MASK_TINT, np.float64)[:, None]
    out = rgb.astype(np.float64)
    for i in range(len(out)):
        out[i][:, masks[i]] = (1 - weight) * out[i][:, masks[i]] + weight * tint
    return np.round(out).astype(np.uint8)


def save_edit_grid(inputs: np.ndarray, edits: np.ndarray, n: int, path: str | Path, scale: int | None = None,
                   title: str | None = None, masks: np.ndarray | None = None) -> None:
    """A PNG grid of edits: one row per input (uint8 NCHW), the input first, then its ``n`` edits
    (``edits`` input-major). ``masks`` (inpainting): the filled region is tinted on the inputs. A
    grey input beside colour edits is shown as grey RGB."""
    if masks is not None:
        inputs = tint_masked(inputs, masks)
    if inputs.shape[1] != edits.shape[1]:
        if edits.shape[1] == 1:
            edits = np.repeat(edits, 3, axis=1)
        else:
            inputs = np.repeat(inputs, edits.shape[1], axis=1)
    rows = []
    for i in range(len(inputs)):
        rows += [inputs[i:i + 1], edits[i * n:(i + 1) * n]]
    save_image_grid(np.concatenate(rows), path, nrow=n + 1, scale=scale, title=title)
