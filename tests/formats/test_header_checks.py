"""The GGUF and safetensors header checks: on well-formed files they agree with the
libraries' own readers (offsets, sizes, shapes, dtypes); each kind of inconsistency is
refused in one ModelLoadError line naming the file and the field, before anything is
mapped; from_gguf_tensor refuses data of the wrong size."""

from __future__ import annotations

import json
import struct

import gguf
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from slimformer.errors import ModelLoadError
from slimformer.formats.gguf import BLOCK_BYTES, from_gguf_tensor
from slimformer.formats.gguf_check import check_gguf
from slimformer.formats.safetensors_check import check_safetensors


def _write_gguf(path, *, endianess=gguf.GGUFEndian.LITTLE, alignment=None):
    w = gguf.GGUFWriter(str(path), "llama", endianess=endianess)
    if alignment is not None:
        w.add_custom_alignment(alignment)
    w.add_uint32("llama.block_count", 1)
    w.add_string("general.name", "t")
    w.add_array("tokenizer.ggml.tokens", ["a", "bb", "ccc"])
    w.add_array("tokenizer.ggml.scores", [0.5, 1.5, 2.5])
    rng = np.random.default_rng(0)
    w.add_tensor("a.weight", rng.standard_normal((3, 64)).astype(np.float32))
    w.add_tensor("n.weight", np.ones(7, dtype=np.float16))
    for name, qtype in (("q8", "Q8_0"), ("q4", "Q4_0"), ("q41", "Q4_1")):
        blocks = rng.integers(0, 256, (5, 2 * BLOCK_BYTES[qtype]), dtype=np.uint8)
        w.add_tensor(f"{name}.weight", blocks, raw_dtype=gguf.GGMLQuantizationType[qtype])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("endianess", [gguf.GGUFEndian.LITTLE, gguf.GGUFEndian.BIG])
@pytest.mark.parametrize("alignment", [None, 64])
def test_gguf_layout_agrees_with_gguf_reader(tmp_path, endianess, alignment):
    path = _write_gguf(tmp_path / "m.gguf", endianess=endianess, alignment=alignment)
    layout = check_gguf(path)
    reader = gguf.GGUFReader(str(path))
    assert layout.alignment == reader.alignment == (alignment or 32)
    assert layout.data_offset == reader.data_offset
    assert [(t.name, t.offset, t.nbytes, t.type_name, list(t.dims)) for t in layout.tensors] == \
        [(t.name, t.data_offset, t.n_bytes, t.tensor_type.name, [int(d) for d in t.shape]) for t in reader.tensors]
    assert layout.metadata["general.name"] == "t"
    assert layout.metadata["tokenizer.ggml.tokens"] == ("ARRAY", "STRING", 3)


class _Fields:
    """The recorded structural fields of a GGUF file, to overwrite one by label."""

    def __init__(self, path):
        self.path = path
        self.fields = check_gguf(path, record_fields=True).fields

    def set(self, label: str, value: int, nth: int = 0) -> None:
        pos, size, _ = [f for f in self.fields if f[2] == label][nth]
        data = bytearray(self.path.read_bytes())
        data[pos:pos + size] = value.to_bytes(size, "little")
        self.path.write_bytes(bytes(data))


@pytest.mark.parametrize("label,value,nth,field", [
    ("version", 1, 0, "version"),
    ("tensor count", 2**40, 0, "tensor count"),
    ("kv count", 2**40, 0, "key/value count"),
    ("string length", 2**62, 0, "key 0"),                 # the first key's length
    ("value type", 13, 0, "type"),
    ("array length", 2**30, 0, "array"),
    ("array type", 9, 0, "array type"),                   # nested arrays
    ("n_dims", 5, 0, "n_dims"),
    ("n_dims", 0, 0, "n_dims"),
    ("ggml type", 99, 0, "type"),
    ("dim 0", 33, 2, "dim 0"),                            # q8: not whole Q8_0 blocks
    ("dim 1", 2**40, 0, "dims"),                          # more bytes than the file
    ("tensor offset", 8, 1, "offset"),                    # not aligned
    ("tensor offset", 1 << 20, 1, "offset"),              # past the end
    ("tensor offset", 0, 1, "overlaps"),                  # on top of the first tensor
])
def test_gguf_inconsistencies_refused_naming_the_field(tmp_path, label, value, nth, field):
    path = _write_gguf(tmp_path / "m.gguf")
    _Fields(path).set(label, value, nth)
    with pytest.raises(ModelLoadError) as err:
        check_gguf(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and field in message


def test_gguf_truncations_and_bad_magic(tmp_path):
    path = _write_gguf(tmp_path / "m.gguf")
    data = path.read_bytes()
    layout = check_gguf(path)
    last = max(t.offset + t.nbytes for t in layout.tensors)
    for cut in (0, 3, 20, 40, 100, layout.data_offset - 1, last - 1):
        path.write_bytes(data[:cut])
        with pytest.raises(ModelLoadError, match="GGUF"):
            check_gguf(path)
    path.write_bytes(b"GGML" + data[4:])
    with pytest.raises(ModelLoadError, match="magic"):
        check_gguf(path)


def test_gguf_duplicate_key_and_alignment(tmp_path):
    path = _write_gguf(tmp_path / "m.gguf", alignment=64)
    data = path.read_bytes()
    path.write_bytes(data.replace(b"llama.block_count", b"general.alignment", 1))
    with pytest.raises(ModelLoadError, match="appears twice"):
        check_gguf(path)
    fields = _Fields(_write_gguf(tmp_path / "n.gguf", alignment=64))
    raw = bytearray(fields.path.read_bytes())
    at = raw.index(b"general.alignment") + len(b"general.alignment") + 4
    raw[at:at + 4] = struct.pack("<I", 48)
    fields.path.write_bytes(bytes(raw))
    with pytest.raises(ModelLoadError, match="general.alignment"):
        check_gguf(fields.path)


def test_from_gguf_tensor_checks_the_data_size():
    blocks = np.zeros((4, 2 * BLOCK_BYTES["Q4_0"]), dtype=np.uint8)
    from_gguf_tensor("t", "Q4_0", blocks, 4, 64)
    for N, K in ((5, 64), (4, 96), (4, 0), (-1, 64)):
        with pytest.raises(ModelLoadError, match="t"):
            from_gguf_tensor("t", "Q4_0", blocks, N, K)
    with pytest.raises(ModelLoadError, match="F32"):
        from_gguf_tensor("t", "F32", np.zeros(10, dtype=np.float32), 3, 4)
    with pytest.raises(ModelLoadError, match="F16"):
        from_gguf_tensor("t", "F16", np.zeros(12, dtype=np.float32), 3, 4)   # wrong element type


# ----------------------------------------------------------------------------- safetensors

def _write_st(path):
    save_file({"w": torch.randn(4, 8), "b": torch.zeros(4, dtype=torch.float16),
               "q": torch.arange(12, dtype=torch.uint8).reshape(3, 4), "e": torch.zeros(0, 3)},
              str(path), metadata={"format": "pt"})
    return path


def test_safetensors_header_agrees_with_the_library(tmp_path):
    path = _write_st(tmp_path / "a.safetensors")
    header = check_safetensors(path)
    assert header.metadata == {"format": "pt"}
    data = path.read_bytes()
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == set(header.tensors)
        for key in f.keys():
            t = f.get_tensor(key)
            entry = header.tensors[key]
            assert list(t.shape) == list(entry.shape)
            assert data[entry.begin:entry.end] == t.contiguous().view(torch.uint8).numpy().tobytes()


def _rewrite(path, edit):
    data = path.read_bytes()
    (n,) = struct.unpack_from("<Q", data)
    header = json.loads(data[8:8 + n])
    body = data[8 + n:]
    body = edit(header, body) or body
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


@pytest.mark.parametrize("edit,field", [
    (lambda h, b: h["w"].update(shape=[4, 9]), "'w' shape"),
    (lambda h, b: h["w"].update(dtype="F4"), "'w' dtype"),
    (lambda h, b: h["w"].update(shape=[2**31, 2**31]), "'w' shape"),
    (lambda h, b: h["w"].update(data_offsets=[0, 2**63]), "'w' data_offsets"),
    (lambda h, b: h["w"].update(data_offsets=[h["w"]["data_offsets"][1], h["w"]["data_offsets"][0]]), "data_offsets"),
    (lambda h, b: h["w"].update(extra=1), "'w'"),
    (lambda h, b: h.update(__metadata__={"a": 1}), "__metadata__"),
    (lambda h, b: b + b"\0" * 8, "data section"),                       # bytes after the last tensor
    (lambda h, b: h["q"].update(data_offsets=h["w"]["data_offsets"], dtype="F32", shape=[4, 8]), "overlaps"),
])
def test_safetensors_inconsistencies_refused_naming_the_field(tmp_path, edit, field):
    path = _write_st(tmp_path / "a.safetensors")
    _rewrite(path, edit)
    with pytest.raises(ModelLoadError) as err:
        check_safetensors(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value) and field in str(err.value)


def test_safetensors_length_field_and_header_text(tmp_path):
    path = _write_st(tmp_path / "a.safetensors")
    data = path.read_bytes()
    for raw, fragment in ((data[:5], "header length"), (struct.pack("<Q", 2**63) + data[8:], "header length"),
                          (struct.pack("<Q", 4) + b"[1] " + data[8:], "header"),
                          (data[:8] + b"\xff" + data[9:], "header")):
        path.write_bytes(raw)
        with pytest.raises(ModelLoadError, match=fragment):
            check_safetensors(path)
    dup = b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, "a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}'
    path.write_bytes(struct.pack("<Q", len(dup)) + dup + b"\0")
    with pytest.raises(ModelLoadError, match="duplicate"):
        check_safetensors(path)
