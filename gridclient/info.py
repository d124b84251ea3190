"""Typed views of the gateway's model JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Placement:
    """One replica of a model on one node."""

    node: int
    node_name: str
    status: str  # "pending", "transferring", "ready" or "failed"
    error: str = ""
    updated: str | None = None  # ISO 8601 time of the last status change

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Placement:
        return cls(
            node=data["node"],
            node_name=data.get("node_name", ""),
            status=data["status"],
            error=data.get("error") or "",
            updated=data.get("updated"),
        )


@dataclass(frozen=True)
class ModelInfo:
    """A model registered with the gateway, from ``GET /api/models/{model_id}/``.

    ``input_signature`` is a list of ``{"name", "dtype", "shape"}`` dicts, with
    None for dynamic dimensions. Fields that this client version does not know
    are kept in ``extra``.
    """

    model_id: str
    status: str  # "placing", "ready", "degraded" or "failed"
    owner: str | None = None
    format: str = "torch.export"
    sha256: str = ""
    size: int = 0
    input_signature: list[dict[str, Any]] = field(default_factory=list)
    allow_remote_inference: bool = False
    allow_download: bool = False
    replicas: int = 1
    created: str | None = None
    status_reason: str = ""
    ready_replicas: int = 0
    placements: list[Placement] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelInfo:
        known = {
            "model_id",
            "status",
            "owner",
            "format",
            "sha256",
            "size",
            "input_signature",
            "allow_remote_inference",
            "allow_download",
            "replicas",
            "created",
            "status_reason",
            "ready_replicas",
            "placements",
        }
        values = {key: data[key] for key in known if key in data}
        values["placements"] = [
            Placement.from_json(p) for p in data.get("placements") or []
        ]
        values["input_signature"] = list(data.get("input_signature") or [])
        values["status_reason"] = data.get("status_reason") or ""
        values["extra"] = {
            key: value for key, value in data.items() if key not in known
        }
        return cls(**values)

    @property
    def input_names(self) -> list[str]:
        return [entry["name"] for entry in self.input_signature]

    def to_dict(self) -> dict[str, Any]:
        """Return the model as plain JSON-compatible data, with ``extra`` merged in."""
        data = asdict(self)
        extra = data.pop("extra")
        data.update(extra)
        return data


@dataclass(frozen=True)
class JobInfo:
    """One inference request as the gateway ran it, from its X-Grid-* headers."""

    job_id: str | None
    node: str | None  # name of the node that returned the output
    attempts: int  # nodes tried, so above 1 means the gateway failed over
    # Names of the nodes whose outputs agreed under verify=2, else empty.
    verified_by: tuple[str, ...] = ()


@dataclass(frozen=True)
class InferenceInfo:
    """The requests of one run_remote_inference call, in dataset order.

    ``node``, ``job_id``, ``attempts`` and ``verified_by`` are those of the last
    request, which is the only one unless the dataset was split into chunks.
    """

    jobs: tuple[JobInfo, ...]

    @property
    def node(self) -> str | None:
        return self.jobs[-1].node

    @property
    def job_id(self) -> str | None:
        return self.jobs[-1].job_id

    @property
    def attempts(self) -> int:
        return self.jobs[-1].attempts

    @property
    def verified_by(self) -> tuple[str, ...]:
        return self.jobs[-1].verified_by


@dataclass(frozen=True)
class DatasetRef:
    """A dataset held on a node, as ``search()`` lists it.

    Pass it, or the search result dict itself, as ``run_remote_inference``'s
    ``dataset`` to run a model where the dataset lives.
    """

    name: str
    node: int  # the id of the node that holds the dataset
    node_name: str = ""
    node_status: str = ""
    tags: tuple[str, ...] = ()
    rows: int = 0
    label_tensor: str = ""

    @classmethod
    def from_value(cls, value: Any) -> DatasetRef | None:
        """Return a DatasetRef for a DatasetRef or a search result dict, else None.

        A dict of tensors is never mistaken for one: a search result has a
        string ``name`` and an integer ``node``.
        """
        if isinstance(value, DatasetRef):
            return value
        if not isinstance(value, dict):
            return None
        name, node = value.get("name"), value.get("node")
        if not isinstance(name, str) or not isinstance(node, int) or isinstance(node, bool):
            return None
        return cls(
            name=name,
            node=node,
            node_name=value.get("node_name") or "",
            node_status=value.get("node_status") or "",
            tags=tuple(value.get("tags") or ()),
            rows=value.get("rows") or 0,
            label_tensor=value.get("label_tensor") or "",
        )

