"""The stand-alone benchmark scripts as a person runs them: bench_ffn removes the model file it wrote (also when the
run fails), bench_kernels shows progress and records how long it took and on which CPU; and
`python -m sparrow.training` without torch says what to install instead of a traceback."""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile

import pytest
from conftest import package_root
from sparrow.bench_device import bench_ffn

SMALL_FFN = ["--hidden", "256", "--experts", "8", "--width", "32", "--layers", "2", "--fractions", "0.5",
             "--threads", "1", "--rounds", "1", "--reps", "2"]


def test_bench_ffn_leaves_no_model_file_behind(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    out = tmp_path / "ffn.json"
    bench_ffn.main([*SMALL_FFN, "--out", str(out)])
    assert json.loads(out.read_text())["results"] and [p.name for p in tmp_path.iterdir()] == ["ffn.json"]
    out.unlink()

    def broken(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(bench_ffn.testing, "ffn_time", broken)
    with pytest.raises(RuntimeError, match="interrupted"):
        bench_ffn.main(SMALL_FFN)
    assert list(tmp_path.iterdir()) == []


def test_bench_kernels_shows_progress_and_records_its_time(tmp_path):
    out = tmp_path / "kernels.json"
    r = subprocess.run([sys.executable, "-m", "sparrow.bench_device.bench_kernels", "--shapes", "attn_k", "--types",
                        "Q4_0", "--T", "1", "2", "--rounds", "1", "--min-time", "0.001", "--cold-mb", "0",
                        "--out", str(out)], cwd=package_root(), capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    assert "kernels: 100%" in r.stderr and "2/2" in r.stderr  # the progress bar, on stderr
    d = json.loads(out.read_text())
    assert d["duration_s"] > 0 and d["machine"]["cpu_model"] and f"{d['duration_s']:.0f} s" in r.stdout


def test_training_without_torch_says_what_to_install(tmp_path):
    # A `torch` that cannot be imported, first on the path: as on an install without the `train` extra.
    (tmp_path / "torch.py").write_text("raise ModuleNotFoundError(\"No module named 'torch'\", name='torch')\n")
    env_path = f"{tmp_path}"
    code = f"import sys; sys.path.insert(0, {env_path!r}); import runpy; sys.argv = ['x', '--help']; " \
           "runpy.run_module('sparrow.training', run_name='__main__')"
    r = subprocess.run([sys.executable, "-c", code], cwd=package_root(), capture_output=True, text=True, timeout=120,
                       check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "torch" in r.stderr and "pip install" in r.stderr and "[train]" in r.stderr
