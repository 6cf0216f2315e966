import os
import pathlib

import pytest

# Tests run on the CPU in float32 with deterministic reductions; keep XLA to the cores we have.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

TESTDATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "testdata"


@pytest.fixture(scope="session")
def official_tiny_dir():
    """The official PyTorch VAR's outputs on fixed inputs (shared/testdata beside the clone)."""
    path = pathlib.Path(os.environ.get("VAR_JAX_TESTDATA", TESTDATA)) / "official_var_tiny"
    if not path.is_dir():
        pytest.fail(f"parity test data not found at {path}; set VAR_JAX_TESTDATA")
    return path
