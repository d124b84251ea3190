"""Host capabilities that the agent reports to the gateway in ``hello``."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

_CGROUP_MEMORY_MAX = Path("/sys/fs/cgroup/memory.max")


def usable_cpu_count() -> int:
    """Return the CPUs this process may run on, which a container can restrict."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def memory_bytes() -> int:
    """Return physical memory, or the cgroup v2 limit when it is lower.

    Returns 0 when neither can be read.
    """
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        logger.warning("cannot read the physical memory size; reporting 0 bytes")
        physical = 0

    try:
        limit = _CGROUP_MEMORY_MAX.read_text().strip()
    except OSError:
        return physical
    if not limit.isdigit():  # "max" means no limit
        return physical
    return min(physical, int(limit)) if physical else int(limit)


def capabilities() -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "cpu_count": usable_cpu_count(),
        "memory_bytes": memory_bytes(),
        "device": "cpu",
    }
