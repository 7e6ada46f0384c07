"""Regenerate ``space/examples/``: a few public-domain/CC0 photos and synthetic scenes, plus ``examples.json``.

Why the files are committed rather than made at start-up: the deployed Space is this folder alone, without
scikit-image (a large dependency used only for its sample photos) or the repository's ``clipviz`` package. Run from
the repository root with scikit-image installed::

    python space/make_examples.py

Photos come from scikit-image's bundled samples (licences in ``examples/LICENSES.md``); scenes are held-out scenes
of ``clipviz.scenes`` (the split the embedded models never trained on), prompted with their objects' captions plus
one caption of an object that is absent.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

SPACE_DIR = Path(__file__).resolve().parent
EXAMPLES_DIR = SPACE_DIR / "examples"
PHOTOS = {  # scikit-image sample → prompts
    "chelsea": ["a photo of a cat", "a photo of a dog", "a photo of a cup of coffee"],
    "coffee": ["a photo of a cup of coffee", "a photo of a spoon", "a photo of a cat"],
    "astronaut": ["a photo of an astronaut", "a photo of a flag", "a photo of a rocket"],
    "rocket": ["a photo of a rocket", "a photo of smoke", "a photo of a cat"],
}
SCENE_INDICES = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9)  # candidates from the held-out split; multi-object ones are kept
NUM_SCENES = 3


def photo_rows() -> list[dict]:
    """Save each sample photo as JPEG (quality 90) and return its manifest rows."""
    import skimage.data

    rows = []
    for name, prompts in PHOTOS.items():
        pixels = getattr(skimage.data, name)()
        Image.fromarray(np.asarray(pixels, dtype=np.uint8)).convert("RGB").save(
            EXAMPLES_DIR / f"{name}.jpg", quality=90
        )
        rows.append({"file": f"{name}.jpg", "prompts": prompts, "method": "relevance", "source": f"skimage:{name}"})
    return rows


def scene_rows() -> list[dict]:
    """Save held-out multi-object scenes as PNG (native 64×64) and return manifest rows with their captions."""
    sys.path.insert(0, str(SPACE_DIR.parent))
    from clipviz import scenes

    rows = []
    for index in SCENE_INDICES:
        seed = scenes.scene_seed("eval", index)
        scene = scenes.make_scene(seed)
        if len(scene.objects) < 2:
            continue
        absent = next(c for c in scenes.all_captions() if c not in scene.captions)
        Image.fromarray(scene.image).save(EXAMPLES_DIR / f"scene_{seed}.png")
        rows.append(
            {"file": f"scene_{seed}.png", "prompts": [*scene.captions, absent], "method": "relevance", "seed": seed}
        )
        if len(rows) == NUM_SCENES:
            break
    return rows


def main() -> None:
    EXAMPLES_DIR.mkdir(exist_ok=True)
    rows = scene_rows() + photo_rows()
    (EXAMPLES_DIR / "examples.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(f"wrote {len(rows)} examples to {EXAMPLES_DIR}")


if __name__ == "__main__":
    main()
