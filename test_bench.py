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


def test_ready_optimizer_allocates_adams_state_and_moves_nothing(tiny):
    """The timed update must not pay AdamW's first-step state allocation (train.py pays it
    once per run): ready_optimizer leaves every parameter's exp_avg / exp_avg_sq in place,
    the weights unchanged and no gradient behind."""
    import torch

    import models
    import precision

    _, path = tiny
    model, _ = models.load_model(path, "cpu")
    master = precision.MasterWeights(model, "bf16")
    before = [p.detach().clone() for p in master.params]
    opt = bench.ready_optimizer(master)
    assert all(set(opt.state[p]) >= {"exp_avg", "exp_avg_sq"} for p in master.params)
    assert all(torch.equal(p, b) for p, b in zip(master.params, before))
    assert all(p.grad is None for p in master.params + master.model_params)


def test_bench_update_only_reports_the_ratio_to_the_bound(tiny, tmp_path, capsys):
    _, path = tiny
    out = tmp_path / "bench.json"
    assert bench.main(["--model", path, "--update-only", "--precision", "fp32", "--repeats", "3", "--group-size", "2",
                       "--max-turn-tokens", "8", "--mu", "2", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    b, runs = res["bound"], res["ours"]["runs"]
    # each repetition's update (per optimizer iteration: mu = 2) over the bound of its own episodes
    per = b["per_repetition"]
    assert [r["update_per_iteration_s"] for r in per] == [r["update_s"] / 2 for r in runs]
    assert all(r["bound_s"] > 0 and r["ratio"] == r["update_per_iteration_s"] / r["bound_s"] for r in per)
    assert b["update_over_bound"] == sorted(r["ratio"] for r in per)[1]  # the median of 3
    assert per[-1]["bound_s"] == b["per_shape_s"][b["best_shape"]]  # the last one's is the sweep's best shape
    assert "update per iteration / bound" in capsys.readouterr().out


def test_bench_whole_step_divides_each_update_by_its_own_bound(tiny, tmp_path):
    """The default mode (today's float32 step against ours, TRL skipped) on the tiny model:
    its update/bound ratio is per repetition, over the bound of that repetition's episodes."""
    _, path = tiny
    out = tmp_path / "bench.json"
    assert bench.main(["--model", path, "--no-trl", "--precision", "fp32", "--repeats", "2", "--group-size", "2",
                       "--max-turn-tokens", "8", "--mu", "1", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    per = res["bound"]["per_repetition"]
    assert [r["update_per_iteration_s"] for r in per] == [r["update_s"] for r in res["ours"]["runs"]]
    assert res["bound"]["update_over_bound"] == (per[0]["ratio"] + per[1]["ratio"]) / 2  # the median of 2
