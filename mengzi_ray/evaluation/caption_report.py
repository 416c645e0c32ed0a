"""The human side of a caption evaluation: report.md (metric tables) and examples.png (images + captions).

Chinese text is drawn only with a CJK font found on the machine (WenQuanYi, Noto/Source Han CJK, ... — Debian's
fonts-wqy-microhei in the project's set-up). Without one the PNG is not drawn (matplotlib would draw empty
boxes) and the report says why. Called by the evaluate job.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence
from urllib.parse import unquote, urlparse

import numpy as np

from mengzi_ray.evaluation.caption_metrics import CaptionScores, format_table
from mengzi_ray.storage import filesystem_for, write_bytes

CJK_FONT_NAMES = ("WenQuanYi", "Noto Sans CJK", "Noto Serif CJK", "Source Han", "Droid Sans Fallback", "AR PL")


@dataclass(frozen=True)
class Example:
    """One image of the PNG: where it is (file path, file:// or s3:// URI) and its captions."""

    image_id: str
    source: str
    prediction: str
    references: list[str]


def find_cjk_font() -> Path | None:
    """Path of an installed font with CJK glyphs (first of CJK_FONT_NAMES matplotlib knows), or None."""
    from matplotlib import font_manager

    def lookup(manager) -> Path | None:
        by_name = {f.name: f.fname for f in manager.ttflist}
        for wanted in CJK_FONT_NAMES:
            for name, path in sorted(by_name.items()):
                if name.startswith(wanted):
                    return Path(path)
        return None

    # matplotlib's font cache does not notice fonts installed after it was written: rescan once before giving up
    return lookup(font_manager.fontManager) or lookup(font_manager.FontManager())


def draw_examples(examples: Sequence[Example], out_path: str | Path, font: Path) -> Path:
    """A grid, one panel per example: the image, then the generated caption and the references below it."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import font_manager
    from matplotlib import pyplot as plt

    prop = font_manager.FontProperties(fname=str(font), size=9)
    cols = min(3, len(examples))
    rows = -(-len(examples) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 4.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, ex in zip(axes.flat, examples):
        ax.imshow(_read_image(ex.source))
        lines = [f"{ex.image_id}", f"生成: {ex.prediction}", *(f"参考: {r}" for r in ex.references[:3])]
        ax.set_title("\n".join(lines), fontproperties=prop, loc="left")
    fig.tight_layout()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def write_report(
    out_path: str | Path,
    scores: Sequence[CaptionScores],
    summary: dict,
    examples_png: Path | None,
    examples: Sequence[Example],
    no_png_reason: str | None,
) -> Path:
    """report.md: what was evaluated, one table per tokenisation, and the examples (PNG link or text + reason)."""
    lines = [
        "# Caption evaluation",
        "",
        f"- model: `{summary['model_dir']}`",
        f"- features: `{summary['features']}`; references: `{summary['references']}` (split {summary['split']})",
        f"- images scored: {summary['num_images']}; decoding: beam {summary['num_beams']}, "
        f"max length {summary['max_gen_length']}",
    ]
    lines += [f"- warning: {w}" for w in summary.get("warnings", [])]
    for result in scores:
        lines += ["", "```", format_table(result), "```"]
    lines += ["", "## Examples", ""]
    if examples_png is not None:
        lines.append(f"![examples]({examples_png.name})")
    else:
        lines.append(f"(no examples.png: {no_png_reason})")
    lines.append("")
    for ex in examples:
        lines.append(f"- `{ex.image_id}`: **{ex.prediction}** — references: {' / '.join(ex.references)}")
    out = Path(out_path)
    write_bytes(str(out), ("\n".join(lines) + "\n").encode("utf-8"))
    return out


def _read_image(source: str) -> np.ndarray:
    from PIL import Image

    location = unquote(urlparse(source).path) if source.startswith("file://") else source
    fs, path = filesystem_for(location)
    with fs.open_input_file(path) as f:
        data = f.read()
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
