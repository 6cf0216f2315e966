"""The repository's config files and scripts, loaded by path as `--config=configs/x.py` and
`python scripts/x.py` load them: the package itself is installed, so nothing edits sys.path."""

import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(relative_path: str):
    """The module at ROOT/relative_path, executed once per process (scripts define absl flags,
    which may exist only once)."""
    name = "_repo_" + os.path.splitext(relative_path)[0].replace(os.sep, "_").replace("/", "_")
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, relative_path))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]
