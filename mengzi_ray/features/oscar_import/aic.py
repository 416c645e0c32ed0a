"""`aic_icc`: the AI Challenger image-captioning annotations (`caption_train_annotations_20170902.json`,
`caption_validation_annotations_20170910.json`) → text rows.

Source layout: one JSON array of `{"url": ..., "image_id": "<sha1>.jpg", "caption": [5 strings]}`, read element
by element. Our image_id is the file name without its extension (with the card's `image_id_prefix`), which is the
id the extraction job gives that image file when the image dir is listed (path relative to the root, no
extension). Captions are kept as written except for surrounding whitespace (the files hold some "\\n"-prefixed
ones); an empty caption is a failed row.
"""

from __future__ import annotations

import posixpath
from typing import Any

from mengzi_ray.features.oscar_import.cards import AicIccImport
from mengzi_ray.features.oscar_import.common import RowError, json_array, normalize_image_id
from mengzi_ray.features.oscar_import.context import ImportRun


def aic_image_id(file_name: Any, prefix: str = "") -> str:
    """AIC-ICC `image_id` ("<hash>.jpg") → our image_id (prefix + "<hash>")."""
    name = normalize_image_id(file_name)
    return prefix + posixpath.splitext(name)[0]


def run_aic_icc(card: AicIccImport) -> dict[str, Any]:
    """Annotations json(s) → text.jsonl (one row per caption, `kind: caption`, the card's split, then each of
    more_annotations)."""
    run = ImportRun(card)
    images = {card.split: annotation_rows(run, card.annotations, card.split, card.image_id_prefix)}
    for split, source in card.more_annotations.items():
        images[split] = annotation_rows(run, source, split, card.image_id_prefix)
    return run.finish(images=images)


def annotation_rows(run: ImportRun, source: str, split: str, prefix: str) -> int:
    """One annotations json → text rows of `split`; returns the number of images read."""
    images = 0
    try:
        for line, element in json_array(source):
            run.log.read["images"] += 1
            try:
                if not isinstance(element, dict) or not isinstance(element.get("caption"), list):
                    raise RowError("caption", f"{source} line {line}: expected {{url, image_id, caption: [...]}}")
                image_id = aic_image_id(element.get("image_id"), prefix)
            except RowError as exc:
                run.fail("images", source, line, exc)
                continue
            images += 1
            for index, caption in enumerate(element["caption"]):
                run.log.read["text"] += 1
                text = caption.strip() if isinstance(caption, str) else ""
                if not text:
                    run.fail("text", source, line, RowError("caption", f"{source} line {line}: caption {index} "
                                                            f"of {image_id!r} is empty or not a string"), image_id)
                    continue
                run.add_text({"image_id": image_id, "text": text, "kind": "caption", "split": split})
    except RowError as exc:
        run.fail("images", source, None, exc)
    return images
