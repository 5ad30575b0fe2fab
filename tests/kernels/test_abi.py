"""slimformer.h and kernels/abi.py declare the same ABI: every exported function with the
same argument types and return type, every struct with the same fields in the same order.
Adding a C field or parameter without updating Python fails here."""

from __future__ import annotations

import ctypes
import re
from pathlib import Path

import pytest

from slimformer.kernels import abi

HEADER = Path(abi.__file__).with_name("slimformer.h")


def _code() -> str:
    text = HEADER.read_text()
    text = re.sub(r"//[^\n]*", "", text)
    return re.sub(r"/\*.*?\*/", "", text, flags=re.S)


def _ctype(c: str):
    c = " ".join(c.replace("const", "").replace("struct", "").split())
    if "*" in c:
        return abi.P
    return {"int": abi.INT, "int32_t": abi.I32, "int64_t": abi.I64, "float": abi.F32, "void": None}[c]


def header_functions() -> dict:
    out = {}
    for ret, name, params in re.findall(r"^\s*([\w ]+?\**)\s*\b(sf_\w+)\s*\(([^)]*)\)\s*;", _code(), flags=re.M):
        params = " ".join(params.split())
        args = [] if params in ("", "void") else [re.sub(r"\w+$", "", p.strip()) for p in params.split(",")]
        out[name] = (_ctype(ret), [_ctype(a) for a in args])
    return out


def header_structs() -> dict:
    out = {}
    for name, body in re.findall(r"struct\s+(Sf\w+)\s*\{(.*?)\};", _code(), flags=re.S):
        fields = []
        for decl in body.split(";"):
            decl = " ".join(decl.split())
            if decl:
                m = re.match(r"(.+?)\s*\b(\w+)$", decl)
                fields.append((m.group(2), m.group(1)))
        out[name] = fields
    return out


def test_header_parses():
    fns, structs = header_functions(), header_structs()
    assert len(fns) >= 20 and "sf_decode_step" in fns and "sf_abi_version" in fns
    assert set(structs) == {"SfLinear", "SfLayer", "SfScratch", "SfModel"}


def test_version_matches():
    m = re.search(r"#define\s+SF_ABI_VERSION\s+(\d+)", HEADER.read_text())
    assert int(m.group(1)) == abi.ABI_VERSION


def test_functions_match():
    fns = header_functions()
    assert set(fns) == set(abi.FUNCTIONS), "functions declared on one side only: " \
        f"{sorted(set(fns) ^ set(abi.FUNCTIONS))}"
    for name, (ret, args) in fns.items():
        py_ret, py_args = abi.FUNCTIONS[name]
        assert len(py_args) == len(args), f"{name}: {len(args)} arguments in C, {len(py_args)} in abi.py"
        assert list(py_args) == args, f"{name}: argument types differ"
        assert py_ret == ret, f"{name}: return type differs"


@pytest.mark.parametrize("name", list(abi.STRUCTS))
def test_structs_match(name):
    c_fields = header_structs()[name]
    py = abi.STRUCTS[name]
    assert [n for n, _ in c_fields] == [n for n, _ in py._fields_], f"{name}: field names/order differ"
    for (n, ctype), (_, pytype) in zip(c_fields, py._fields_):
        if ctype.startswith("struct ") and "*" not in ctype:
            assert pytype is abi.STRUCTS[ctype.split()[1]], f"{name}.{n}"
        else:
            assert pytype is _ctype(ctype), f"{name}.{n}: {ctype} vs {pytype}"


def test_parser_catches_an_added_field(monkeypatch):
    text = HEADER.read_text().replace("struct SfScratch* scratch;", "struct SfScratch* scratch;\n    int32_t window;")
    monkeypatch.setattr(HEADER.__class__, "read_text", lambda self, *a, **k: text)
    assert header_structs()["SfModel"][-1][0] == "window"
    assert [n for n, _ in header_structs()["SfModel"]] != [n for n, _ in abi.CModel._fields_]
