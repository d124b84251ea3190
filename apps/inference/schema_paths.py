"""OpenAPI operations of the plain async views, written by hand.

The inference, job, dataset and download views are plain Django functions,
kept off DRF for latency, so drf-spectacular cannot inspect them.
gridsite.schema.add_plain_views adds these paths to the generated schema.
Keep each operation in step with its view.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings

from gridsite.schema import SAFETENSORS, error_refs

BINARY = {"schema": {"type": "string", "format": "binary"}}
SECURITY = [{"bearerAuth": []}]

MODEL_ID = {
    "in": "path",
    "name": "model_id",
    "required": True,
    "schema": {"type": "string"},
    "description": "The model_id given when the model was served.",
    "example": "digits-cnn",
}

JOB_ID = {
    "in": "path",
    "name": "job_id",
    "required": True,
    "schema": {"type": "string", "format": "uuid"},
    "description": "The job id returned when the job was submitted.",
}

JOB_HEADERS = {
    "X-Grid-Job-Id": {
        "schema": {"type": "string", "format": "uuid"},
        "description": "The inference job's id.",
    },
    "X-Grid-Node": {
        "schema": {"type": "string"},
        "description": "The name of the node that answered.",
    },
    "X-Grid-Attempts": {
        "schema": {"type": "integer"},
        "description": "Nodes tried; above 1 means the job failed over to another replica.",
    },
}

INFER_ERRORS = (400, 404, 405, 413, 415, 422, 502, 503, 504)

NULLABLE_STRING = {"type": "string", "nullable": True}

JOB = {
    "type": "object",
    "required": ["job_id", "url", "model", "status", "attempts", "created", "deadline"],
    "properties": {
        "job_id": {"type": "string", "format": "uuid"},
        "url": {"type": "string", "description": "Where to poll the job."},
        "model": {"type": "string", "description": "The model_id."},
        "status": {
            "type": "string",
            "enum": ["queued", "running", "succeeded", "failed"],
        },
        "node": {
            **NULLABLE_STRING,
            "description": "The node running or that ran the job.",
        },
        "attempts": {"type": "integer"},
        "error_code": NULLABLE_STRING,
        "error": NULLABLE_STRING,
        "created": {"type": "string", "format": "date-time"},
        "finished": {"type": "string", "format": "date-time", "nullable": True},
        "deadline": {"type": "string", "format": "date-time"},
        "result_url": {
            "type": "string",
            "description": "Present once the job succeeded.",
        },
    },
}

JOB_EXAMPLE = {
    "job_id": "5b0e0c1e-9a7e-4d0b-8c53-0f4b1a7e2d11",
    "url": "/api/jobs/5b0e0c1e-9a7e-4d0b-8c53-0f4b1a7e2d11/",
    "model": "digits-cnn",
    "status": "succeeded",
    "node": "node-a",
    "attempts": 1,
    "error_code": None,
    "error": None,
    "created": "2026-12-04T17:09:00Z",
    "finished": "2026-12-04T17:09:00.040Z",
    "deadline": "2026-12-04T17:09:30Z",
    "result_url": "/api/jobs/5b0e0c1e-9a7e-4d0b-8c53-0f4b1a7e2d11/result/",
}


def _timeout_parameter() -> dict[str, Any]:
    limit = settings.GRID["INFER_TIMEOUT_MAX"]
    return {
        "in": "query",
        "name": "timeout",
        "required": False,
        "schema": {
            "type": "number",
            "exclusiveMinimum": True,
            "minimum": 0,
            "maximum": limit,
        },
        "description": f"Seconds the gateway waits for the result, failovers included; at most {limit:g}.",
        "example": 30,
    }


def _tensor_body() -> dict[str, Any]:
    return {
        "required": True,
        "description": (
            "A safetensors file with one tensor per model input, named as in the model's "
            "input_signature; dim 0 is the batch. application/octet-stream is accepted too."
        ),
        "content": {SAFETENSORS: BINARY, "application/octet-stream": BINARY},
    }


def _infer() -> dict[str, Any]:
    return {
        "operationId": "models_infer",
        "summary": "Run inference",
        "description": (
            "Send the inputs as safetensors and get the outputs back as safetensors: `output` for "
            "a single output, `output_0`, `output_1`... for several. The gateway checks names, "
            "dtypes and shapes before any node sees the request, sends it to the least busy ready "
            "replica, and moves it to another replica when that node fails.\n\n"
            "Needs the `infer` scope. Users other than the owner and staff may run a model only "
            "when it was served with `allow_remote_inference`. Inference has its own rate limit, "
            "GRID_INFER_THROTTLE_RATE."
        ),
        "tags": ["models"],
        "security": SECURITY,
        "parameters": [MODEL_ID, _timeout_parameter()],
        "requestBody": _tensor_body(),
        "responses": {
            "200": {
                "description": "The outputs as safetensors.",
                "headers": JOB_HEADERS,
                "content": {SAFETENSORS: BINARY},
            },
            **error_refs(*INFER_ERRORS),
        },
    }


def _infer_dataset() -> dict[str, Any]:
    request = {
        "type": "object",
        "required": ["node", "dataset"],
        "properties": {
            "node": {
                "type": "integer",
                "description": "The id of the node that holds the dataset, as search returns it.",
            },
            "dataset": {
                "type": "string",
                "pattern": "^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$",
            },
            "aggregate": {
                "type": "boolean",
                "default": False,
                "description": "Return a summary, not one row each.",
            },
            "outputs": {
                "type": "string",
                "enum": ["argmax", "raw"],
                "default": "argmax",
            },
        },
    }
    result = {
        "type": "object",
        "required": ["model_id", "node", "node_name", "dataset", "job_id"],
        "properties": {
            "model_id": {"type": "string"},
            "node": {"type": "integer"},
            "node_name": {"type": "string"},
            "dataset": {"type": "string"},
            "job_id": {"type": "string", "format": "uuid"},
            "predictions": {
                "type": "array",
                "items": {"type": "integer"},
                "description": "The argmax class per row.",
            },
            "summary": {
                "type": "object",
                "description": "With aggregate: rows, class_counts, and with a label tensor correct and accuracy.",
                "additionalProperties": True,
            },
        },
    }
    return {
        "operationId": "models_infer_dataset",
        "summary": "Run a model over a dataset on its node",
        "description": (
            "Run the model on the node that holds the dataset, so the rows never leave it: the "
            "gateway places a replica there first when needed. Returns the argmax class per row, "
            "a summary with `aggregate`, or the raw outputs as safetensors with "
            '`"outputs": "raw"`. Needs the `infer` scope, like inference.'
        ),
        "tags": ["models"],
        "security": SECURITY,
        "parameters": [MODEL_ID, _timeout_parameter()],
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": request,
                    "examples": {
                        "summary": {
                            "value": {
                                "node": 3,
                                "dataset": "digits-test-1",
                                "aggregate": True,
                            }
                        }
                    },
                }
            },
        },
        "responses": {
            "200": {
                "description": "Predictions or a summary as JSON, or raw outputs as safetensors.",
                "headers": {
                    name: JOB_HEADERS[name] for name in ("X-Grid-Job-Id", "X-Grid-Node")
                },
                "content": {
                    "application/json": {
                        "schema": result,
                        "examples": {
                            "predictions": {
                                "value": {
                                    "model_id": "digits-cnn",
                                    "node": 3,
                                    "node_name": "node-c",
                                    "dataset": "digits-test-1",
                                    "job_id": "5b0e0c1e-9a7e-4d0b-8c53-0f4b1a7e2d11",
                                    "predictions": [7, 2, 1, 0],
                                }
                            }
                        },
                    },
                    SAFETENSORS: BINARY,
                },
            },
            **error_refs(*INFER_ERRORS),
        },
    }


def _create_job() -> dict[str, Any]:
    model = {
        "in": "query",
        "name": "model",
        "required": True,
        "schema": {"type": "string"},
        "description": "The model_id to run.",
        "example": "digits-cnn",
    }
    key = {
        "in": "header",
        "name": "Idempotency-Key",
        "required": False,
        "schema": {"type": "string", "pattern": "^[A-Za-z0-9_.:-]{1,200}$"},
        "description": "A retried request with the same key gets the same job instead of a new one.",
    }
    job = {
        "schema": JOB,
        "examples": {
            "queued": {"value": {**JOB_EXAMPLE, "status": "queued", "finished": None}}
        },
    }
    location = {
        "Location": {"schema": {"type": "string"}, "description": "The job's URL."}
    }
    return {
        "operationId": "jobs_create",
        "summary": "Submit an inference job",
        "description": (
            "Like inference, but returns 202 at once with the job; poll `GET /api/jobs/{job_id}/` "
            "and read the outputs from `GET /api/jobs/{job_id}/result/`. Needs the `infer` scope."
        ),
        "tags": ["jobs"],
        "security": SECURITY,
        "parameters": [model, key, _timeout_parameter()],
        "requestBody": _tensor_body(),
        "responses": {
            "202": {
                "description": "Accepted.",
                "headers": location,
                "content": {"application/json": job},
            },
            "200": {
                "description": "The job that an earlier request with this Idempotency-Key created.",
                "headers": location,
                "content": {"application/json": job},
            },
            **error_refs(404, 405, 409, 413, 415, 503),
        },
    }


def _job_detail() -> dict[str, Any]:
    return {
        "operationId": "jobs_retrieve",
        "summary": "Get an inference job",
        "description": "The job's status. Jobs are visible to the user who submitted them and to staff.",
        "tags": ["jobs"],
        "security": SECURITY,
        "parameters": [JOB_ID],
        "responses": {
            "200": {
                "description": "The job.",
                "content": {
                    "application/json": {
                        "schema": JOB,
                        "examples": {"succeeded": {"value": JOB_EXAMPLE}},
                    }
                },
            },
            **error_refs(404),
        },
    }


def _job_result() -> dict[str, Any]:
    return {
        "operationId": "jobs_result",
        "summary": "Get an inference job's outputs",
        "description": (
            "The outputs as safetensors once the job succeeded. A job still running gets 409 with "
            "Retry-After; a failed job gets the status of its error, as inference would."
        ),
        "tags": ["jobs"],
        "security": SECURITY,
        "parameters": [JOB_ID],
        "responses": {
            "200": {
                "description": "The outputs as safetensors.",
                "headers": {"X-Grid-Job-Id": JOB_HEADERS["X-Grid-Job-Id"]},
                "content": {SAFETENSORS: BINARY},
            },
            **error_refs(404, 409, 410, 422, 502, 503, 504),
        },
    }


def _download() -> dict[str, Any]:
    return {
        "operationId": "models_download",
        "summary": "Download a model",
        "description": (
            "Stream the model's .pt2 file from one of its replicas. Needs the `read` scope, and the "
            "model must have been served with `allow_download`."
        ),
        "tags": ["models"],
        "security": SECURITY,
        "parameters": [MODEL_ID],
        "responses": {
            "200": {
                "description": "The program saved with torch.export.save.",
                "headers": {
                    "X-Grid-Sha256": {
                        "schema": {"type": "string"},
                        "description": "SHA-256 of the file.",
                    }
                },
                "content": {"application/octet-stream": BINARY},
            },
            **error_refs(404, 405, 503),
        },
    }


def plain_operations() -> dict[str, dict[str, Any]]:
    """Return the path items of the plain views, keyed by OpenAPI path."""
    return {
        "/api/models/{model_id}/infer/": {"post": _infer()},
        "/api/models/{model_id}/infer-dataset/": {"post": _infer_dataset()},
        "/api/models/{model_id}/download/": {"get": _download()},
        "/api/jobs/": {"post": _create_job()},
        "/api/jobs/{job_id}/": {"get": _job_detail()},
        "/api/jobs/{job_id}/result/": {"get": _job_result()},
    }
