"""The Grid Network tutorial as a script: serve a model, query it, search, disconnect.

It follows PySyft's "Introducing the Grid Network" notebook with Grid's client
(`import gridclient as gr`). The notebook's skin-cancer CNN is replaced by a
small classifier of scikit-learn's handwritten digits, trained here in about
a second, so the script needs no download.

Run it against a gateway with at least one agent online and a staff token:

    pip install "./gridclient[torch]" scikit-learn
    GRID_URL=http://127.0.0.1:8000 GRID_TOKEN=grid_... python docs/tutorial.py

`gr.GridNetwork(url)` reads the token from GRID_TOKEN. The last step,
`disconnect_nodes()`, needs a staff token with the admin scope, and it
disconnects every agent of the network: they stay down until restarted.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import gridclient as gr

MODEL_ID = "digits-grid-model"


def get_data_sample() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return train and held-out images (N, 1, 8, 8) in [0, 1] and their labels."""
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    train_x, test_x, train_y, test_y = train_test_split(
        images, digits.target, test_size=0.2, random_state=0, stratify=digits.target
    )
    return (
        torch.from_numpy(train_x),
        torch.from_numpy(test_x),
        torch.from_numpy(train_y).long(),
        torch.from_numpy(test_y).long(),
    )


def make_model(train_x: torch.Tensor, train_y: torch.Tensor) -> nn.Module:
    """Train a two-layer classifier with full-batch Adam; about a second on a CPU."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(200):
        optimizer.zero_grad()
        loss_fn(model(train_x), train_y).backward()
        optimizer.step()
    return model.eval()


def main() -> int:
    # Connect to the Grid Network: one gateway, not each worker.
    gateway = gr.GridNetwork(os.environ.get("GRID_URL", "http://127.0.0.1:8000"))
    nodes = [
        node["name"] for node in gateway.connected_nodes() if node["status"] == "online"
    ]
    print(f"connected to {gateway.url}: {len(nodes)} nodes online ({', '.join(nodes)})")

    # Prepare data and model.
    train_x, data, train_y, target = get_data_sample()
    model = make_model(train_x, train_y)
    gr.build(model, data)

    # Serve the model. The gateway stores no model: it sends it to a node.
    try:
        gateway.delete_model(MODEL_ID)
        print(f"deleted the {MODEL_ID} left by an earlier run")
    except gr.NotFound:
        pass
    info = gateway.serve_model(
        model, MODEL_ID, allow_remote_inference=True, allow_download=False
    )
    holders = ", ".join(p.node_name for p in info.placements if p.status == "ready")
    print(f"served {MODEL_ID}: {info.status} on {holders}")

    # Query the model.
    logits = gateway.run_remote_inference(model_id=MODEL_ID, dataset=data)
    accuracy = (logits.argmax(1) == target).float().mean().item()
    print(f"remote inference: {len(logits)} predictions, accuracy {accuracy:.3f}")

    # Find data by tags: the gateway routes by query, the data stays on the nodes.
    datasets = gateway.search("digits", "test")
    names = ", ".join(f"{d['name']}@{d['node_name']}" for d in datasets) or "none"
    print(f"datasets tagged digits and test: {len(datasets)} ({names})")

    # Disconnect from the network.
    count = gateway.disconnect_nodes()
    print(f"disconnected {count} nodes")
    gateway.close()
    return 0 if accuracy >= 0.9 else 1


if __name__ == "__main__":
    sys.exit(main())
