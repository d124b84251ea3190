"""Python client for Grid, a network for private model hosting and remote inference.

import gridclient as gr

with gr.GridNetwork("https://grid.example.org", token="...") as gateway:
    gr.build(model, data)
    gateway.serve_model(model, "my-model", allow_remote_inference=True)
    outputs = gateway.run_remote_inference("my-model", data)
"""

from .async_client import AsyncGridNetwork
from .client import GridNetwork
from .exceptions import (
    Conflict,
    Forbidden,
    GatewayTimeout,
    GridConnectionError,
    GridError,
    InvalidInput,
    ModelError,
    NotFound,
    PayloadTooLarge,
    PlacementError,
    PlacementTimeout,
    RateLimited,
    Unauthorized,
    Unavailable,
    UnsupportedMediaType,
    VerificationMismatch,
)
from .export import build
from .info import DatasetRef, InferenceInfo, JobInfo, ModelInfo, Placement
from .jobs import AsyncJob, Job

__version__ = "0.1.0"

__all__ = [
    "AsyncGridNetwork",
    "AsyncJob",
    "Conflict",
    "DatasetRef",
    "Forbidden",
    "GatewayTimeout",
    "GridConnectionError",
    "GridError",
    "GridNetwork",
    "InferenceInfo",
    "InvalidInput",
    "Job",
    "JobInfo",
    "ModelError",
    "ModelInfo",
    "NotFound",
    "PayloadTooLarge",
    "Placement",
    "PlacementError",
    "PlacementTimeout",
    "RateLimited",
    "Unauthorized",
    "Unavailable",
    "UnsupportedMediaType",
    "VerificationMismatch",
    "build",
]
