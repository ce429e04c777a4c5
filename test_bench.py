"""bench.py runs (its numbers are measurements, not tested): --decode-only on the tiny
model writes its report, and the static-cache decode agrees with the sampler's."""

import json

import bench


def test_bench_decode_only_writes_its_report(tiny, tmp_path, capsys):
    _, path = tiny
    out = tmp_path / "bench.json"
    assert bench.main(["--model", path, "--decode-only", "--precision", "fp32", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res["decode_step_ms"]) == {"1", "4", "16"} and all(v > 0 for v in res["decode_step_ms"].values())
    for variant in ("sampler", "static_eager"):  # float32: the HF eager step's greedy tokens and log-probs
        v = res["decode_variants"][variant]
        assert v["same_argmax"] == 1.0 and v["max_logp_diff"] < 1e-4 and v["ms"] > 0, variant
    assert "decode step, 16 rows: HF eager / sampler" in capsys.readouterr().out
