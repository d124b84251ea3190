"""Store the dataset metadata that agents report. The rows stay on the nodes.

An agent reports its whole list in ``hello`` and again in ``datasets`` after a
rescan that changed it. Each report replaces the node's rows in one
transaction, so a search never returns half of a report. The gateway checks every
entry itself: an entry that breaks a rule is logged and dropped, and the rest
of the report is kept.
"""

from __future__ import annotations

import logging
from typing import Any

from django.db import transaction

from apps.registry.models import Dataset
from gridproto.datasets import (
    MAX_DESCRIPTION,
    MAX_TAGS,
    MAX_TENSORS,
    is_name,
    normalize_tag,
)
from gridproto.tensors import DTYPES

logger = logging.getLogger(__name__)

# The agent reports at most 256 datasets; more is a bug or a hostile agent.
MAX_REPORTED = 256
MAX_RANK = 8


class InvalidEntry(ValueError):
    """A reported dataset that breaks a rule. The message names the field."""


def _tensors(raw: Any) -> dict[str, dict[str, Any]]:
    if not isinstance(raw, dict) or not raw or len(raw) > MAX_TENSORS:
        raise InvalidEntry(f"tensors must map 1-{MAX_TENSORS} tensor names to their dtype and shape")
    tensors = {}
    for name, info in raw.items():
        if not isinstance(name, str) or not 0 < len(name) <= 100 or not isinstance(info, dict):
            raise InvalidEntry(f"tensor {str(name)[:100]!r} is malformed")
        dtype, shape = info.get("dtype"), info.get("shape")
        if dtype not in DTYPES.values():
            raise InvalidEntry(f"tensor {name!r} has unsupported dtype {dtype!r}")
        if not (
            isinstance(shape, list)
            and 0 < len(shape) <= MAX_RANK
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        ):
            raise InvalidEntry(f"tensor {name!r} has an invalid shape {shape!r}")
        tensors[name] = {"dtype": dtype, "shape": shape}
    return tensors


def clean_entry(raw: Any) -> dict[str, Any]:
    """Return the fields of a Dataset row from one reported entry, or raise InvalidEntry."""
    if not isinstance(raw, dict):
        raise InvalidEntry("each dataset must be a JSON object")
    name = raw.get("name")
    if not is_name(name):
        raise InvalidEntry(f"name {str(name)[:100]!r} is invalid")

    tags_raw = raw.get("tags")
    if not isinstance(tags_raw, list) or not 0 < len(tags_raw) <= MAX_TAGS:
        raise InvalidEntry(f"dataset {name!r}: tags must be a list of 1-{MAX_TAGS} tags")
    tags = [normalize_tag(tag) for tag in tags_raw]
    if None in tags:
        raise InvalidEntry(f"dataset {name!r}: tag {tags_raw[tags.index(None)]!r} is invalid")

    description = raw.get("description", "")
    if not isinstance(description, str) or len(description) > MAX_DESCRIPTION:
        raise InvalidEntry(f"dataset {name!r}: description must be text of at most {MAX_DESCRIPTION} characters")

    tensors = _tensors(raw.get("tensors"))
    rows = raw.get("rows")
    if not isinstance(rows, int) or isinstance(rows, bool) or rows < 0:
        raise InvalidEntry(f"dataset {name!r}: rows must be a non-negative integer")
    if any(info["shape"][0] != rows for info in tensors.values()):
        raise InvalidEntry(f"dataset {name!r}: every tensor must have {rows} rows at dimension 0")
    label = raw.get("label_tensor") or ""
    if label and label not in tensors:
        raise InvalidEntry(f"dataset {name!r}: label_tensor {str(label)[:100]!r} is not one of its tensors")

    return {
        "name": name,
        "tags": list(dict.fromkeys(tags)),
        "description": description,
        "tensors": tensors,
        "rows": rows,
        "label_tensor": label,
    }


def replace_node_datasets(node_id: int, reported: Any) -> int:
    """Replace a node's datasets with the valid entries of a report and return their count.

    The old rows are deleted and the new ones inserted in one transaction.
    """
    if not isinstance(reported, list):
        logger.warning("node %s reported datasets that are not a list; storing none", node_id)
        reported = []
    if len(reported) > MAX_REPORTED:
        logger.warning("node %s reported %s datasets; keeping the first %s", node_id, len(reported), MAX_REPORTED)
        reported = reported[:MAX_REPORTED]
    rows: dict[str, Dataset] = {}
    for entry in reported:
        try:
            fields = clean_entry(entry)
        except InvalidEntry as exc:
            logger.warning("node %s reported an invalid dataset, which is dropped: %s", node_id, exc)
            continue
        if fields["name"] in rows:
            logger.warning("node %s reported dataset %s twice; keeping the first", node_id, fields["name"])
            continue
        rows[fields["name"]] = Dataset(node_id=node_id, **fields)
    with transaction.atomic():
        Dataset.objects.filter(node_id=node_id).delete()
        Dataset.objects.bulk_create(rows.values())
    logger.info("node %s offers %s datasets: %s", node_id, len(rows), ", ".join(sorted(rows)) or "none")
    return len(rows)
