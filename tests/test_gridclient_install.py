"""gridclient installs alone into a fresh virtual environment, without torch."""

import shutil
import subprocess
import venv
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "gridclient"

CHECK = """
import importlib.util
import httpx, numpy as np, safetensors.numpy
import gridclient as gr
print(gr.__file__)
print(gr.__version__, gr.GridNetwork.__name__, gr.AsyncGridNetwork.__name__)
print("torch found:", importlib.util.find_spec("torch") is not None)
print("django found:", importlib.util.find_spec("django") is not None)

def handler(request):
    if request.method == "GET":
        signature = [{"name": "x", "dtype": "float32", "shape": [None, 2]}]
        return httpx.Response(200, json={"model_id": "m1", "status": "ready", "input_signature": signature})
    x = safetensors.numpy.load(request.read())["x"]
    return httpx.Response(200, content=safetensors.numpy.save({"output": x * 3}))

with gr.GridNetwork("http://127.0.0.1:9", transport=httpx.MockTransport(handler)) as gateway:
    print(gateway.run_remote_inference("m1", np.ones((2, 2), np.float32)).tolist())
"""


@pytest.mark.timeout(900)
def test_installs_without_torch(tmp_path):
    venv.create(tmp_path / "env", with_pip=True)
    python = tmp_path / "env" / "bin" / "python"
    # pip builds in place, because the package directory is the project root,
    # so a copy keeps build/ and *.egg-info out of the source tree.
    source = tmp_path / "src" / "gridclient"
    ignore = shutil.ignore_patterns("__pycache__", "build", "*.egg-info")
    shutil.copytree(PACKAGE, source, ignore=ignore)

    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", str(source)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stderr

    # Run from an empty folder so that no source copy shadows the install.
    workdir = tmp_path / "run"
    workdir.mkdir()
    check = subprocess.run(
        [str(python), "-c", CHECK],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=workdir,
    )
    assert check.returncode == 0, check.stderr
    lines = check.stdout.splitlines()
    assert lines[0].startswith(str(tmp_path / "env"))
    assert lines[1] == "0.1.0 GridNetwork AsyncGridNetwork"
    assert lines[2] == "torch found: False"
    assert lines[3] == "django found: False"
    assert lines[4] == "[[3.0, 3.0], [3.0, 3.0]]"
