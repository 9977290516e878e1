"""Market-1501 person attributes: names, coding and the label file reader.

The attribute file ``market_attribute.mat`` (Lin et al., Pattern Recognition 2019) holds 27
attributes per identity.  We use 30 binary attributes: every field is positive when its value
is 2, and ``age`` (1..4) is split one-hot into ``age1`` .. ``age4``.
"""

from __future__ import annotations

# The 27 attribute fields of ``market_attribute.mat`` (plus ``image_index``, the identity strings).
# Their order differs between the train and test structs: always look them up by name.
MAT_FIELDS: tuple[str, ...] = (
    "age", "backpack", "bag", "handbag", "clothes", "down", "up", "hair", "hat", "gender",
    "upblack", "upwhite", "upred", "uppurple", "upyellow", "upgray", "upblue", "upgreen",
    "downblack", "downwhite", "downpink", "downpurple", "downyellow", "downgray", "downblue",
    "downgreen", "downbrown",
)

# The 30 binary attributes, in the order every array of this project uses.
ATTRIBUTE_NAMES: tuple[str, ...] = (
    "backpack", "bag", "handbag", "clothes", "down", "up", "hair", "hat", "gender",
    "upblack", "upwhite", "upred", "uppurple", "upyellow", "upgray", "upblue", "upgreen",
    "downblack", "downwhite", "downpink", "downpurple", "downyellow", "downgray", "downblue",
    "downgreen", "downbrown", "age1", "age2", "age3", "age4",
)
NUM_ATTRIBUTES = len(ATTRIBUTE_NAMES)

# What a positive (value 2 in the .mat file) means, for each binary attribute.
ATTRIBUTE_MEANINGS: dict[str, str] = {
    "backpack": "carries a backpack",
    "bag": "carries a bag",
    "handbag": "carries a handbag",
    "clothes": "wears pants (not a dress)",
    "down": "short lower-body clothing",
    "up": "short sleeves",
    "hair": "long hair",
    "hat": "wears a hat",
    "gender": "female",
    **{f"up{c}": f"upper-body clothing is {c}" for c in
       ("black", "white", "red", "purple", "yellow", "gray", "blue", "green")},
    **{f"down{c}": f"lower-body clothing is {c}" for c in
       ("black", "white", "pink", "purple", "yellow", "gray", "blue", "green", "brown")},
    "age1": "young", "age2": "teenager", "age3": "adult", "age4": "old",
}


def display_name(name: str, present: bool) -> str:
    """The paper's display form: ``gender`` when present (female), ``!gender`` when absent."""
    if name not in ATTRIBUTE_MEANINGS:
        raise ValueError(f"unknown attribute {name!r}; expected one of {ATTRIBUTE_NAMES}")
    return name if present else f"!{name}"
