"""transformers' own common model tests (`ModelTesterMixin`), taken from the sdist of the installed release.

The sdist ships `tests/test_modeling_common.py` and the other top-level common test files, but not the `tests/exporters`
and `tests/generation` packages that `test_modeling_common.py` imports its two base mixins from. `ExportTesterMixin`
and `GenerationTesterMixin` are therefore replaced by empty classes: the export and `generate()` tests they would add
are not in the sdist and do not run (generation is covered by tests/test_modeling.py and tests/test_transformers_common.py).

Run `python tests/transformers_sdist.py` to fetch the sdist with pip into `tests/.transformers-sdist/`
(gitignored); the test module fetches it on first use as well.
"""

import importlib
import subprocess
import sys
import tarfile
import types
from pathlib import Path

import transformers


CACHE_ROOT = Path(__file__).resolve().parent / ".transformers-sdist"
PACKAGE = "transformers_sdist_tests"
# Base mixins that test_modeling_common.py imports from packages missing from the sdist.
MISSING_FROM_SDIST = {"exporters.test_export": "ExportTesterMixin", "generation.test_utils": "GenerationTesterMixin"}


def fetch_command(version: str, destination: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--no-deps",
        "--no-binary",
        ":all:",
        f"transformers=={version}",
        "--dest",
        str(destination),
    ]


def ensure_common_tests(version: str = transformers.__version__) -> Path:
    """The folder holding the `transformers_sdist_tests` package of `version`, fetching the sdist if needed."""
    folder = CACHE_ROOT / version
    package = folder / PACKAGE
    if (package / "test_modeling_common.py").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    archive = folder / f"transformers-{version}.tar.gz"
    if not archive.exists():
        command = fetch_command(version, folder)
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0 or not archive.exists():
            raise RuntimeError(
                f"Could not fetch the transformers {version} sdist with `{' '.join(command)}` (PyPI must be "
                f"reachable once; the file is cached in {folder}):\n{result.stderr[-2000:]}"
            )
    prefix = f"transformers-{version}/tests/"
    package.mkdir(exist_ok=True)
    with tarfile.open(archive) as sdist:
        for member in sdist.getmembers():
            name = member.name[len(prefix) :] if member.name.startswith(prefix) else ""
            if member.isfile() and name.endswith(".py") and "/" not in name:
                (package / name).write_bytes(sdist.extractfile(member).read())
    (package / "__init__.py").write_text("")
    return folder


def load_test_modeling_common(version: str = transformers.__version__) -> types.ModuleType:
    """transformers' `tests/test_modeling_common.py` of `version`, importable with empty stand-ins for the base mixins
    the sdist lacks."""
    folder = ensure_common_tests(version)
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    importlib.import_module(PACKAGE)
    for module_path, class_name in MISSING_FROM_SDIST.items():
        parent_name, _ = module_path.split(".")
        parent = sys.modules.setdefault(f"{PACKAGE}.{parent_name}", types.ModuleType(f"{PACKAGE}.{parent_name}"))
        module = sys.modules.setdefault(f"{PACKAGE}.{module_path}", types.ModuleType(f"{PACKAGE}.{module_path}"))
        setattr(module, class_name, getattr(module, class_name, None) or type(class_name, (), {}))
        setattr(parent, module_path.split(".")[1], module)
    return importlib.import_module(f"{PACKAGE}.test_modeling_common")


if __name__ == "__main__":
    print(ensure_common_tests())
