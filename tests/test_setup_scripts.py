"""scripts/setup.sh picks a torch build the machine can run: the driver -> CUDA table and the pip command.

The table (scripts/torch_index.py) is checked at the edges of every row against NVIDIA's minimum driver
versions; setup.sh runs in its dry-run mode (prints the pip commands) against a fake ``nvidia-smi`` on
PATH and a venv whose Python has no torch (``python -S``: no site-packages), so nothing is installed.
"""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _torch_index():
    spec = importlib.util.spec_from_file_location("torch_index", SCRIPTS / "torch_index.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("driver, tag", [
    ("590.44.01", "cu130"), ("580.65.06", "cu130"), ("580.65.05", "cu128"), ("575.51.03", "cu128"),
    ("570.26", "cu128"), ("570.25.99", "cu126"), ("565.57.01", "cu126"), ("560.28.03", "cu126"),
    ("560.28.02", "cu124"), ("555.42.06", "cu124"), ("550.54.14", "cu124"), ("550.54.13", "cu118"),
    ("535.183.01", "cu118"), ("525.147.05", "cu118"), ("520.61.05", "cu118"),
])
def test_driver_maps_to_the_newest_cuda_it_runs_natively(driver, tag):
    assert _torch_index().choose_build(driver).tag == tag


def test_torch_ranges_are_those_published_for_each_cuda():
    builds = {b.tag: b.requirement for b in _torch_index().BUILDS}
    assert builds == {"cu130": "torch>=2.9", "cu128": "torch>=2.7", "cu126": "torch>=2.6",
                      "cu124": "torch>=2.6,<2.7", "cu118": "torch>=2.6,<2.8"}


def test_old_driver_and_pre_turing_gpus():
    ti = _torch_index()
    assert ti.choose_build("520.61.04") is None
    assert ti.choose_build("470.256.02") is None
    assert ti.choose_build("580.82.07", "7.0").tag == "cu126"  # V100: no kernels in CUDA 12.8+ builds
    assert ti.choose_build("580.82.07", "9.0").tag == "cu130"
    with pytest.raises(ValueError):
        ti.parse_version("N/A")


def _fake_env(tmp_path: Path, nvidia_smi: str, venv_python: str = "") -> dict:
    """PATH with a fake nvidia-smi first; a venv folder whose bin/python is ``venv_python`` or torch-less Python."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    tool = bin_dir / "nvidia-smi"
    tool.write_text("#!/bin/sh\n" + nvidia_smi)
    tool.chmod(0o755)
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(f'#!/bin/sh\nexec {venv_python or sys.executable + " -S"} "$@"\n')
    python.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_SPEC", "TORCH_INDEX_URL", "PIP_INDEX_URL")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", SETUP_DRY_RUN="1", VENV=str(venv))
    return env


GPU_535 = ('case "$*" in *-L*) echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)";; '
           '*driver_version*) echo "535.183.01, 9.0";; esac\n')
NO_GPU = 'echo "NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver" >&2; exit 9\n'


def _setup(env: dict, **extra) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPTS / "setup.sh")], cwd=ROOT, env={**env, **extra},
                          capture_output=True, text=True, timeout=60)


def test_setup_on_a_gpu_machine_installs_the_build_for_its_driver(tmp_path):
    out = _setup(_fake_env(tmp_path, GPU_535))
    assert out.returncode == 0, out.stderr
    assert "driver 535.183.01 runs PyTorch's cu118 builds" in out.stdout
    assert "pip install -q torch>=2.6,<2.8 --index-url https://download.pytorch.org/whl/cu118" in out.stdout


def test_setup_overrides_win(tmp_path):
    env = _fake_env(tmp_path, GPU_535)
    out = _setup(env, TORCH_SPEC="torch==2.7.1")
    assert "pip install -q torch==2.7.1 --index-url https://download.pytorch.org/whl/cu118" in out.stdout
    out = _setup(env, TORCH_INDEX_URL="https://mirror.example/whl/cu118")
    assert "--index-url https://mirror.example/whl/cu118" in out.stdout
    out = _setup(env, PIP_INDEX_URL="https://mirror.example/simple")
    assert "pip install -q torch>=2.6,<2.8\n" in out.stdout  # pip's own index setting is left to pip


def test_setup_without_a_gpu_is_unchanged(tmp_path):
    out = _setup(_fake_env(tmp_path, NO_GPU))
    assert out.returncode == 0, out.stderr
    assert "pip install -q torch==2.13.0\n" in out.stdout
    assert "index-url" not in out.stdout


def test_setup_keeps_an_existing_torch(tmp_path):
    out = _setup(_fake_env(tmp_path, GPU_535, venv_python=sys.executable))
    assert out.returncode == 0, out.stderr
    assert "installing" not in out.stdout
    assert "pip install -q -e .[test]" in out.stdout


def test_setup_refuses_a_driver_too_old_for_any_build(tmp_path):
    env = _fake_env(tmp_path, GPU_535.replace("535.183.01", "470.256.02"))
    out = _setup(env)
    assert out.returncode == 1
    assert "driver 470.256.02 is older than 520.61.05" in out.stderr and "upgrade" in out.stderr
    assert "pip install" not in out.stdout
