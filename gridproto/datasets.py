"""Dataset names, tags and the rule that feeds a dataset's tensors to a model.

The agent and the gateway both apply these rules: the agent when it scans its
manifests and runs a model over a dataset, the gateway when it stores what an
agent reports and checks a request before sending it to a node. Nothing here
imports Django or torch.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence

# A dataset name is also the stem of its files on the node, so it has no path
# separator and cannot start with a dot: ".." and hidden files never match.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
# Tags are stored and searched in lowercase.
TAG = re.compile(r"[a-z0-9][a-z0-9_.:-]{0,63}")

MAX_TAGS = 32
MAX_TENSORS = 16
MAX_DESCRIPTION = 1000

NAME_RULE = "1-100 letters, digits, '_', '.' or '-', starting with a letter or digit"
TAG_RULE = "1-64 letters, digits, '_', '.', ':' or '-', starting with a letter or digit"


def is_name(value: object) -> bool:
    return isinstance(value, str) and NAME.fullmatch(value) is not None


def normalize_tag(value: object) -> str | None:
    """Return the tag in lowercase, or None when it is not a valid tag."""
    if not isinstance(value, str):
        return None
    tag = value.strip().lower()
    return tag if TAG.fullmatch(tag) else None


class InputMatchError(ValueError):
    """A dataset whose tensors cannot be fed to a model's inputs."""


def match_inputs(input_names: Sequence[str], tensor_names: Collection[str], label_tensor: str = "") -> dict[str, str]:
    """Map each model input to the dataset tensor that feeds it.

    Inputs are matched by name. A model with one input may also take a dataset
    with exactly one tensor besides its label tensor, whatever its name.
    Raises InputMatchError naming the inputs and tensors otherwise.
    """
    if all(name in tensor_names for name in input_names):
        return {name: name for name in input_names}
    features = sorted(name for name in tensor_names if name != label_tensor)
    if len(input_names) == 1 and len(features) == 1:
        return {input_names[0]: features[0]}
    raise InputMatchError(
        f"the model takes inputs {', '.join(input_names)} but the dataset has tensors "
        f"{', '.join(sorted(tensor_names)) or 'none'}; name the dataset's tensors after "
        "the model's inputs, or use a one-input model with a dataset of one tensor "
        "besides its label tensor"
    )
