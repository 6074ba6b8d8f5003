"""`import memplan` stays light: no torch, no CUDA, no NVML until something asks."""

import subprocess
import sys

CHECK = """
import sys
import memplan, memplan.gpu, memplan.cli, memplan.units, memplan.errors
heavy = sorted(m for m in ("torch", "pynvml", "psutil", "safetensors", "numpy") if m in sys.modules)
assert not heavy, heavy
inventory = memplan.probe("cuda:0=24GiB,cpu=64GiB")
assert "torch" not in sys.modules
print("ok")
"""


def test_import_memplan_does_not_import_torch_or_nvml() -> None:
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_real_probe_does_not_import_torch_on_linux() -> None:
    code = "import sys, memplan; memplan.probe(); assert 'torch' not in sys.modules; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
