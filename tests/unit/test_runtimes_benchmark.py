"""The runtime exploration still runs: one candidate end to end, and IO binding gives `run`'s logits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from benchmarks import runtimes


@pytest.fixture(scope="module")
def resnet18_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "resnet18.onnx"
    runtimes.export_onnx(runtimes.build_model("resnet18"), path, opset=17, dynamo=False)
    return path


def test_io_binding_writes_the_same_logits_as_run_into_its_buffer(resnet18_onnx):
    x = np.random.default_rng(3).standard_normal((2, 3, 224, 224), dtype=np.float32)
    plain = runtimes.OrtRunner(resnet18_onnx, threads=1)
    bound = runtimes.OrtRunner(resnet18_onnx, threads=1, io_binding=True)
    prepared = bound.prepare(x)
    first = bound.run(prepared).copy()
    assert first.shape == (2, runtimes.NUM_CLASSES)
    np.testing.assert_array_equal(first, plain.run(plain.prepare(x)))
    x2 = x[::-1].copy()
    np.testing.assert_array_equal(bound.run(bound.prepare(x2)), plain.run(plain.prepare(x2)))
    with torch.inference_mode():
        reference = runtimes.build_model("resnet18")(torch.from_numpy(x)).numpy()
    assert np.abs(first - reference).max() < 1e-4


def test_one_candidate_end_to_end_agrees_with_torch_and_reports_its_speed(tmp_path, capsys):
    threads = torch.get_num_threads()
    out = tmp_path / "runtimes.json"
    argv = ["--only", "ort-all", "--phases", "forward", "--seconds", "0.05", "--rounds", "2", "--threads", "1"]
    assert runtimes.main([*argv, "--json", str(out)]) == 0
    assert torch.get_num_threads() == threads  # the run leaves the process's torch threads as it found them
    report = json.loads(out.read_text())
    (row,) = report["forward"]
    assert row["name"] == "ort-all" and row["error"] is None
    assert 0 < row["max_abs_dlogit"] < 1e-4  # against torch eager on the same batch: close, yet not the same code
    assert 0 < row["b8_img_s"]["min"] <= row["b8_img_s"]["median"] <= row["b8_img_s"]["max"]
    assert row["b1_p50_ms"]["median"] > 0
    assert set(report["exports"]) == {"legacy17"}
    assert "| ort-all |" in capsys.readouterr().out
