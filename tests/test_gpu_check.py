"""`make gpu-check SMOKE=1`: the GPU session's script runs every part on the CPU with tiny shapes,
so it cannot rot between the rare GPU runs."""
import importlib.util
import json
import os

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "gpu_check.py")


def test_gpu_check_smoke_runs_every_part(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = module.main(["--smoke", "--out", str(tmp_path)])
    assert set(results["parts"]) == set(module.PARTS)
    failed = {name: r["error"] for name, r in results["parts"].items() if "error" in r}
    assert not failed, failed
    for variant in ("exact-fp32", "exact-bf16", "reference-fp32"):
        assert results["parts"][f"train:{variant}"]["tokens_per_second"] > 0
    assert len(results["parts"]["profile"]["top_kernels"]) == 10
    assert results["parts"]["embed"]["bf16"]["sentences_per_second"] > 0
    written = sorted(os.listdir(tmp_path))
    assert [w.rsplit(".", 1)[1] for w in written] == ["json", "md"]
    assert json.load(open(tmp_path / written[0]))["smoke"] is True
