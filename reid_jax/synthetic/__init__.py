"""Synthetic Market-1501-shaped persons: the renderer (``canvas``, ``render``) and the dataset
writer with counterfactual re-rendering (``dataset``), whose public names are given here.

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

__all__ = [
    "ATTRIBUTE_FILE",
    "ATTRIBUTE_PARTS",
    "MARKET_TRAIN_COUNTS",
    "META_FILE",
    "META_FORMAT",
    "META_VERSION",
    "NUM_CAMERAS",
    "SPLIT_FOLDERS",
    "DatasetConfig",
    "attribute_region",
    "change_attribute",
    "contact_sheet",
    "decode_jpeg",
    "encode_jpeg",
    "generate_dataset",
    "image_record",
    "load_meta",
    "person_labels",
    "plan_dataset",
    "render_counterfactual",
    "sample_cameras",
    "sample_person",
]
