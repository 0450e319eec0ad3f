"""The benchmark CLI runs on the CPU in seconds and writes the numbers it prints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from zsharp_sweeps.bench import main, parse_mode


def test_bench_measures_each_optimizer_and_the_ratios(tmp_path: Path, capsys) -> None:
    out = tmp_path / "bench.json"
    code = main(["--device", "cpu", "--model", "mlp", "--optimizers", "sgd,sam,zsharp",
                 "--batch-size", "8", "--steps", "2", "--warmup", "1",
                 "--modes", "fp32,fp32+cl", "--json", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert [run["mode"] for run in result["runs"]] == ["fp32", "fp32+cl"]
    for run in result["runs"]:
        rows = {r["optimizer"]: r for r in run["rows"]}
        assert set(rows) == {"sgd", "sam", "zsharp"}
        for row in rows.values():
            assert row["ms_per_step"] > 0
            assert row["images_per_s"] == pytest.approx(8 * 1000 / row["ms_per_step"], rel=1e-6)
        assert run["ratios"]["zsharp/sam"] == pytest.approx(
            rows["zsharp"]["ms_per_step"] / rows["sam"]["ms_per_step"])
        assert run["ratios"]["sam/sgd"] == pytest.approx(
            rows["sam"]["ms_per_step"] / rows["sgd"]["ms_per_step"])
    printed = capsys.readouterr().out
    assert "zsharp/sam" in printed and "ms_per_step" in printed


def test_bench_loader_mode(tmp_path: Path) -> None:
    out = tmp_path / "loader.json"
    assert main(["--device", "cpu", "--loader", "--batch-size", "64", "--loader-workers", "",
                 "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["loader"]
    assert [r["loader"] for r in rows] == ["device"]
    assert rows[0]["images_per_s"] > 0


def test_bench_rejects_unknown_modes() -> None:
    assert parse_mode("bf16+cl+graph") == {
        "precision": "bf16", "channels_last": True, "compile": False, "cuda_graph": True,
    }
    with pytest.raises(ValueError, match="allowed cl, compile, graph"):
        parse_mode("bf16+turbo")
    with pytest.raises(SystemExit):
        main(["--device", "cpu", "--modes", "fp8"])


def test_zsharp_kernel_variants_and_the_issue_table(tmp_path: Path, capsys) -> None:
    """``--zsharp-kernels torch,auto`` measures one ZSharp row per kernels value in the same
    run (the earlier and the new filter path, on a GPU), each against SAM and SGD; ``--table``
    prints ZSharp/SAM, SAM/SGD and the fraction of the limit from the JSON."""
    out = tmp_path / "bench.json"
    assert main(["--device", "cpu", "--model", "mlp", "--optimizers", "sgd,sam,zsharp",
                 "--zsharp-kernels", "torch,auto", "--batch-size", "8", "--steps", "2",
                 "--warmup", "1", "--modes", "fp32", "--json", str(out)]) == 0
    (run,) = json.loads(out.read_text())["runs"]
    rows = {r["optimizer"]: r for r in run["rows"]}
    assert set(rows) == {"sgd", "sam", "zsharp[torch]", "zsharp[auto]"}
    assert run["ratios"]["zsharp[torch]/sam"] == pytest.approx(
        rows["zsharp[torch]"]["ms_per_step"] / rows["sam"]["ms_per_step"])
    capsys.readouterr()
    assert main(["--table", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["model", "mode", "zsharp", "sgd_img_s", "sam_img_s",
                                "zsharp_img_s", "zsharp/sam", "of_limit", "sam/sgd"]
    assert len(lines) == 3 and lines[1].split()[:3] == ["mlp", "fp32", "zsharp[torch]"]
    zsharp_over_sam, of_limit = (float(x) for x in lines[1].split()[6:8])
    assert of_limit == pytest.approx(1 / zsharp_over_sam, rel=1e-3)


def test_auto_mode_is_what_hardware_auto_resolves_to() -> None:
    assert parse_mode("auto", "cpu", 100) == {
        "precision": "fp32", "channels_last": False, "compile": False, "cuda_graph": False,
    }
