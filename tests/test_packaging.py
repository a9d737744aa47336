"""What the distribution declares matches what it holds and imports.

The wheel itself is built, installed outside the repository and exercised by
scripts/check_wheel.sh, which CI runs after the test suite (.ci/run).
"""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

import mamba_ir

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]

# import name -> distribution name, for every third-party module the package imports
DISTRIBUTIONS = {
    "torch": "torch", "numpy": "numpy", "tqdm": "tqdm", "hypothesis": "hypothesis",
    "safetensors": "safetensors", "transformers": "transformers", "triton": "triton",
    "flashinfer": "flashinfer-python", "matplotlib": "matplotlib", "packaging": "packaging",
}


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower()


def _source_dirs() -> dict[str, Path]:
    """Installed package name -> source folder, as pyproject maps them."""
    dirs = {name: ROOT / name.replace(".", "/") for name in SETUPTOOLS["packages"]}
    dirs.update({name: ROOT / path for name, path in SETUPTOOLS["package-dir"].items()})
    return dirs


def _imports(path: Path) -> set[str]:
    """Top-level names of every absolute import in ``path`` (also those inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    # benchmarks/ is imported by `mamba-ir bench` only, which needs a clone and says so
    return names - set(sys.stdlib_module_names) - {"mamba_ir", "__future__", "benchmarks"}


def _third_party(package: str) -> set[str]:
    return set().union(*(_imports(p) for p in _source_dirs()[package].glob("*.py")))


def test_every_package_folder_is_installed() -> None:
    dirs = _source_dirs()
    for folder in (ROOT / "mamba_ir", ROOT / "passes", ROOT / "impls"):
        for init in folder.rglob("__init__.py"):
            assert init.parent in dirs.values(), f"{init.parent} is missing from pyproject packages"
    assert all(path.is_dir() for path in dirs.values())


def test_every_import_is_a_declared_requirement() -> None:
    declared = {_name(r) for r in PROJECT["dependencies"]}
    for extra in PROJECT["optional-dependencies"].values():
        declared |= {_name(r) for r in extra}
    for package in _source_dirs():
        for module in _third_party(package):
            assert module in DISTRIBUTIONS, f"{package} imports {module}: add it to DISTRIBUTIONS"
            assert DISTRIBUTIONS[module] in declared, f"{package} imports undeclared {module}"


@pytest.mark.parametrize(
    ("extra", "packages"),
    [("testing", ["mamba_ir.testing"]),
     ("hf", ["mamba_ir.models"] + (["mamba_ir.integrations"]
                                   if (ROOT / "mamba_ir/integrations").is_dir() else []))],
)
def test_extras_cover_their_modules(extra: str, packages: list[str]) -> None:
    """``pip install 'mamba-ir[extra]'`` brings everything those modules import."""
    provided = {_name(r) for r in PROJECT["dependencies"] + PROJECT["optional-dependencies"][extra]}
    optional = {"triton", "flashinfer", "matplotlib"}  # providers and plots refuse politely
    for package in packages:
        needed = {DISTRIBUTIONS[m] for m in _third_party(package) - optional}
        assert needed <= provided, f"{package} needs {needed - provided} beyond [{extra}]"


def test_numpy_is_a_dependency() -> None:
    # torch warns on import when numpy is missing
    assert "numpy" in {_name(r) for r in PROJECT["dependencies"]}


def test_license_typed_version_changelog() -> None:
    assert PROJECT["license"] == "Apache-2.0" and PROJECT["license-files"] == ["LICENSE"]
    license_text = " ".join((ROOT / "LICENSE").read_text().split())
    assert license_text.startswith("Apache License Version 2.0, January 2004")
    assert (ROOT / "mamba_ir" / "py.typed").is_file()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["mamba_ir"]
    assert mamba_ir.__version__ == version("mamba-ir") == PROJECT["version"]
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert f"## [{PROJECT['version']}]" in changelog


def _transformers(extra: str) -> Requirement:
    found = [Requirement(r) for r in PROJECT["optional-dependencies"][extra]
             if _name(r) == "transformers"]
    assert len(found) == 1, f"[{extra}] names transformers {len(found)} times"
    return found[0]


def test_dev_tests_the_transformers_hf_allows() -> None:
    """``make test`` (the dev extra) installs a transformers that the hf extra allows, and
    the integration accepts exactly the hf extra's range."""
    from mamba_ir.integrations.transformers import SUPPORTED_TRANSFORMERS

    hf = _transformers("hf")
    assert _transformers("dev") == hf
    assert hf.specifier == SpecifierSet(SUPPORTED_TRANSFORMERS)


def test_the_oldest_transformers_tested_is_the_lower_bound() -> None:
    """``make test-hf-oldest`` runs the transformers tests on the hf extra's lower bound."""
    makefile = (ROOT / "Makefile").read_text()
    oldest = re.search(r"^HF_OLDEST\s*\?=\s*(\S+)\s*$", makefile, re.MULTILINE)
    assert oldest, "the Makefile sets HF_OLDEST"
    lower = [s.version for s in _transformers("hf").specifier if s.operator == ">="]
    assert [Version(v) for v in lower] == [Version(oldest.group(1))]
    assert "make test-hf-oldest" in (ROOT / ".ci" / "run").read_text()


def test_ci_runs_the_wheel_check() -> None:
    assert "make wheel-check" in (ROOT / ".ci" / "run").read_text()
    assert "scripts/check_wheel.sh" in (ROOT / "Makefile").read_text()
    assert (ROOT / "scripts" / "check_wheel.sh").stat().st_mode & 0o111
