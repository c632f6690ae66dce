"""The embedded model's conversion shortcuts change no byte: torch's Q8_0 dequantization equals
gguf-py's bit for bit, and the shared reader is one parse per file, restored afterwards."""

from __future__ import annotations

import gguf
import numpy as np
from gguf.quants import dequantize

from steercmp.lm.embedded import _faster_gguf, dequantize_q8_0


def _q8_0_blocks(rows: int, blocks_per_row: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scales = (rng.standard_normal(rows * blocks_per_row) * 0.02).astype(np.float16)
    special = np.array([0.0, -1e-7, 6.0e4], dtype=np.float16)  # zero, a subnormal, near the largest
    scales[: len(special)] = special[: len(scales)]
    values = rng.integers(-128, 128, size=(rows * blocks_per_row, 32), dtype=np.int8)
    blocks = np.concatenate([scales.view(np.uint8).reshape(-1, 2), values.view(np.uint8)], axis=1)
    return blocks.reshape(rows, blocks_per_row * 34)


def test_q8_0_dequantization_equals_gguf_bit_for_bit():
    data = _q8_0_blocks(rows=7, blocks_per_row=5)
    ours = dequantize_q8_0(data)
    ref = dequantize(data, gguf.GGMLQuantizationType.Q8_0)
    assert ours.shape == ref.shape == (7, 160)
    assert ours.dtype == ref.dtype == np.float32
    assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32))


def test_conversion_parses_a_gguf_once_and_restores_the_module(tmp_path):
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("w", _q8_0_blocks(rows=2, blocks_per_row=1),
                      raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    before = gguf.GGUFReader, gguf.dequantize
    with _faster_gguf():
        first = gguf.GGUFReader(path)
        assert gguf.GGUFReader(str(path)) is first  # one parse, whatever the path's spelling
        tensor = first.tensors[0]
        ref = before[1](tensor.data, tensor.tensor_type)
        assert np.array_equal(gguf.dequantize(tensor.data, tensor.tensor_type), ref)
    assert (gguf.GGUFReader, gguf.dequantize) == before
    assert gguf.GGUFReader(path) is not first
