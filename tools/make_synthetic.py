r"""Writes a synthetic dataset with the Market-1501 layout (see reid_jax/synthetic/dataset.py).

  python tools/make_synthetic.py --output_dir=/tmp/synthetic_market --seed=0 \
      --contact_sheet=/tmp/synthetic_market.png

Market-sized (751 / 750 identities, about 13k train, 20k gallery, 3.4k query images):

  python tools/make_synthetic.py --output_dir=DIR --num_train_ids=751 --num_test_ids=750 \
      --images_per_id=19 --num_distractors=2793 --num_junk=3819 --num_workers=2
"""

from __future__ import annotations

import json
import os

from absl import app, flags

from reid_jax import atomic_io, cli, synthetic

_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Dataset root to create.", required=True)
_NUM_TRAIN_IDS = flags.DEFINE_integer("num_train_ids", 60, "Identities in bounding_box_train.")
_NUM_TEST_IDS = flags.DEFINE_integer("num_test_ids", 60, "Identities in query / gallery.")
_IMAGES_PER_ID = flags.DEFINE_integer(
    "images_per_id", 11, "Mean images per identity (test identities: queries included).")
_TRAIN_IMAGES_PER_ID = flags.DEFINE_integer(
    "train_images_per_id", None, "Mean images per training identity (default: "
    "--images_per_id); at least 4.")
_NUM_DISTRACTORS = flags.DEFINE_integer("num_distractors", 100, "Gallery images with pid 0000.")
_NUM_JUNK = flags.DEFINE_integer("num_junk", 20, "Gallery images with pid -1.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed; the same seed writes the same bytes.")
_JPEG_QUALITY = flags.DEFINE_integer("jpeg_quality", 90, "JPEG quality of every image.")
_NUM_WORKERS = flags.DEFINE_integer("num_workers", 1, "Rendering processes.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing synthetic dataset.")
_MASKS = flags.DEFINE_bool(
    "masks", True, "Also write every image's part mask (masks/<split>/<stem>.png) and "
    "masks/regions.json; see docs/attribute_maps.md.")
_CONTACT_SHEET = flags.DEFINE_string(
    "contact_sheet", None, "Also write a PNG grid of some images with pid, camera, attributes.")
_SHEET_IMAGES = flags.DEFINE_integer("contact_sheet_images", 48, "Images on the contact sheet.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = synthetic.DatasetConfig(
        num_train_ids=_NUM_TRAIN_IDS.value, num_test_ids=_NUM_TEST_IDS.value,
        images_per_id=_IMAGES_PER_ID.value, train_images_per_id=_TRAIN_IMAGES_PER_ID.value,
        num_distractors=_NUM_DISTRACTORS.value,
        num_junk=_NUM_JUNK.value, seed=_SEED.value, jpeg_quality=_JPEG_QUALITY.value)
    # Paths through a file are refused before any image is drawn.
    atomic_io.check_output_folder(_OUTPUT_DIR.value, "--output_dir")
    if _CONTACT_SHEET.value:
        atomic_io.check_output_folder(os.path.dirname(os.path.abspath(_CONTACT_SHEET.value)),
                                      "the folder of --contact_sheet")
    summary = synthetic.generate_dataset(_OUTPUT_DIR.value, config,
                                         num_workers=_NUM_WORKERS.value,
                                         overwrite=_OVERWRITE.value,
                                         write_masks=_MASKS.value)
    if _CONTACT_SHEET.value:
        summary["contact_sheet"] = synthetic.contact_sheet(
            _OUTPUT_DIR.value, _CONTACT_SHEET.value, n=_SHEET_IMAGES.value)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    cli.run(main)
