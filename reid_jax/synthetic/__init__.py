"""Synthetic Market-1501-shaped persons: what a person and a scene are (``person``), the
renderer (``canvas``, ``render``), the dataset
writer with counterfactual re-rendering (``dataset``) and the part masks written beside every
image (``masks``), whose public names are given here; and Market-shaped distance matrices for
the ranking benchmarks (``distances``).

They exist so the real data path (reader, attribute labels, training, explanations) runs and is
tested where Market-1501 cannot be downloaded, and so explanations can be measured against
known causes (a person re-rendered with one attribute changed).
"""

from reid_jax.synthetic.dataset import (
    ATTRIBUTE_FILE,
    ATTRIBUTE_PARTS,
    MARKET_TRAIN_COUNTS,
    META_FILE,
    META_FORMAT,
    META_VERSION,
    NUM_CAMERAS,
    SPLIT_FOLDERS,
    DatasetConfig,
    attribute_region,
    change_attribute,
    contact_sheet,
    decode_jpeg,
    encode_jpeg,
    generate_dataset,
    image_record,
    load_meta,
    person_labels,
    plan_dataset,
    render_counterfactual,
    sample_cameras,
    sample_person,
)
from reid_jax.synthetic.masks import (
    ATTRIBUTE_GROUPS,
    ATTRIBUTE_REGIONS,
    MASKS_FOLDER,
    REGIONS_FILE,
    PartMask,
    attribute_group,
    attribute_regions,
    labels_to_regions,
    localisable,
    mask_path,
    read_attribute_regions,
    read_part_mask,
)

__all__ = [
    "ATTRIBUTE_FILE",
    "ATTRIBUTE_GROUPS",
    "ATTRIBUTE_PARTS",
    "ATTRIBUTE_REGIONS",
    "MARKET_TRAIN_COUNTS",
    "MASKS_FOLDER",
    "META_FILE",
    "META_FORMAT",
    "META_VERSION",
    "NUM_CAMERAS",
    "REGIONS_FILE",
    "SPLIT_FOLDERS",
    "DatasetConfig",
    "PartMask",
    "attribute_group",
    "attribute_region",
    "attribute_regions",
    "change_attribute",
    "contact_sheet",
    "decode_jpeg",
    "encode_jpeg",
    "generate_dataset",
    "image_record",
    "labels_to_regions",
    "load_meta",
    "localisable",
    "mask_path",
    "person_labels",
    "plan_dataset",
    "read_attribute_regions",
    "read_part_mask",
    "render_counterfactual",
    "sample_cameras",
    "sample_person",
]
