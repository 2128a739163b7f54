"""Shared helpers: a minimal safetensors reader (the format is 8 bytes of header length, a JSON
header and raw little-endian data), so the tests need only numpy and pytest."""
import json
import pathlib
import struct

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[3]
DATA = pathlib.Path(__file__).resolve().parent / "data"
DTYPES = {"F64": "<f8", "F32": "<f4", "I64": "<i8", "I32": "<i4", "U8": "u1", "BOOL": "?"}


def load_safetensors(path):
    raw = pathlib.Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        arr = np.frombuffer(raw[8 + n + a:8 + n + b], dtype=DTYPES[info["dtype"]])
        out[name] = arr.reshape(info["shape"]).copy()
    return out


@pytest.fixture(scope="session")
def example_case():
    """The repository's example case and options (examples/reference/)."""
    case = load_safetensors(ROOT / "examples/reference/case.safetensors")
    opts = json.loads((ROOT / "examples/reference/options.json").read_text())
    return case, opts


@pytest.fixture(scope="session")
def example_expected():
    """`sar reference` (the Rust program) on the example case, kept in tests/data/."""
    return load_safetensors(DATA / "example_out.safetensors")
