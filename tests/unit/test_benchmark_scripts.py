"""The benchmark scripts that need no server still run and print a row for each thing they measure."""

from __future__ import annotations

from benchmarks import decode_routes, model_path


def test_model_path_prints_the_path_against_the_bare_forward(capsys):
    assert model_path.main(["--arch", "resnet18", "--batch-size", "2", "--seconds", "0.1", "--device", "cpu"]) == 0
    rows = {line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows == {"bare", "path", "overlap"}


def test_decode_routes_compare_each_route_with_the_exact_one(capsys):
    assert decode_routes.main(["--seconds", "0.05"]) == 0
    lines = capsys.readouterr().out.splitlines()
    exact = next(line for line in lines if line.startswith("exact"))
    assert exact.split()[2:] == ["1.00x", "0.000", "0", "0.00e+00"]  # the exact route against itself
    assert {line.split()[0] for line in lines[2:]} == set(decode_routes.ROUTES)
