"""report.py: the results table and the plot data over train.py logs."""

import json

import pytest

import report


def _write_log(run, rows):
    run.mkdir()
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _eval(step, em, tool, **extra):
    m = {"tool_call_rate": tool, "tool_success": 1.0, "search_has_answer": 0.5, "exact_match": em,
         "contains_answer": em, "format": 0.5}
    return {"step": step, "eval_split": "test", **{f"eval_{k}": v for k, v in m.items()}, **extra}


def test_plot_data_is_the_mean_and_range_over_seeds(tmp_path):
    # two seeds of one method, training rollouts only: tool-call rate smoothed over 2 steps
    _write_log(tmp_path / "m-s0", [{"step": i + 1, "tool_call_rate": v, "R_T": 0.1, "R_O": 0.2} for i, v in enumerate([0.0, 0.2, 0.4])])
    _write_log(tmp_path / "m-s1", [{"step": i + 1, "tool_call_rate": v, "R_T": 0.3, "R_O": 0.2} for i, v in enumerate([0.2, 0.2, 0.8])])
    runs = [str(tmp_path / "m-s0"), str(tmp_path / "m-s1")]
    panels = {title: (held_out, lines) for title, held_out, lines in report.plot_data(runs, smooth=2)}
    held_out, lines = panels["tool-call rate (training rollouts)"]
    steps, mean, lo, hi = lines["m (n=2)"]
    assert not held_out and steps == [1, 2, 3]
    # smoothed: seed 0 [0, 0.1, 0.3], seed 1 [0.2, 0.2, 0.5]
    assert mean == pytest.approx([0.1, 0.15, 0.4]) and lo == pytest.approx([0.0, 0.1, 0.3]) and hi == pytest.approx([0.2, 0.2, 0.5])
    steps, mean, lo, hi = panels["R^T (training rollouts)"][1]["m (n=2)"]
    assert mean == pytest.approx([0.2] * 3) and lo == pytest.approx([0.1] * 3) and hi == pytest.approx([0.3] * 3)
    assert panels["exact match (training rollouts)"][1]["m (n=2)"][0] == []  # never logged: an empty line
    # held-out evaluations win over training rollouts, unsmoothed, titled by their split
    _write_log(tmp_path / "e-s0", [_eval(0, 0.1, 0.2), {"step": 1, "tool_call_rate": 0.9}, _eval(2, 0.3, 0.8)])
    panels = {title: (held_out, lines) for title, held_out, lines in report.plot_data([str(tmp_path / "e-s0")])}
    held_out, lines = panels["tool-call rate (test)"]
    assert held_out and lines["e (n=1)"] == ([0, 2], [0.2, 0.8], [0.2, 0.8], [0.2, 0.8])
    assert not any(t.startswith("probe") for t in panels)  # no run logged the probe: no probe panels
    assert not any(t.startswith("search 1") for t in panels)  # a one-hop run: no hop panels
    # two-hop evaluations: the hop panels come after the first four, from the evaluations
    _write_log(tmp_path / "h-s0", [_eval(0, 0.0, 0.4, eval_bridge_found=0.2, eval_call2_success=0.5),
                                   {"step": 1, "bridge_found": 0.9}, _eval(2, 0.0, 1.0, eval_bridge_found=0.8, eval_call2_success=1.0)])
    hop_panels = report.plot_data([str(tmp_path / "h-s0")])
    assert [t for t, _, _ in hop_panels][4:6] == ["search 1 found the bridge (test)", "search 2 ran (test)"]
    held_out, lines = {t: (h, l) for t, h, l in hop_panels}["search 1 found the bridge (test)"]
    assert held_out and lines["h (n=1)"] == ([0, 2], [0.2, 0.8], [0.2, 0.8], [0.2, 0.8])
    # the probe's panels: per step, not smoothed (an update's swing is the point), mean and range over seeds
    _write_log(tmp_path / "p-s0", [{"step": 0, "probe_second_call": 0.4}, {"step": 1, "probe_second_call": 0.2, "probe_kl_mean": 0.01}])
    _write_log(tmp_path / "p-s1", [{"step": 0, "probe_second_call": 0.6}, {"step": 1, "probe_second_call": 0.0, "probe_kl_mean": 0.03}])
    probe_runs = [str(tmp_path / "p-s0"), str(tmp_path / "p-s1")]
    panels = {title: lines for title, _, lines in report.plot_data(probe_runs, smooth=2)}
    assert panels["probe: P(second tool call) at turn 2"]["p (n=2)"] == ([0, 1], [0.5, 0.1], [0.4, 0.0], [0.6, 0.2])
    steps, mean, lo, hi = panels["probe: KL(before || after) per update, mean"]["p (n=2)"]
    assert steps == [1] and mean == pytest.approx([0.02]) and (lo, hi) == ([0.01], [0.03])
    assert report.plot_runs(probe_runs, str(tmp_path / "probe.png")).endswith("probe.png")
    out = report.plot_runs(runs, str(tmp_path / "curves.png"))
    assert open(out, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(FileNotFoundError, match="no log.jsonl"):
        report.plot_runs([str(tmp_path)], str(tmp_path / "x.png"))


def test_seed_grouping_and_results_table(tmp_path):
    assert report.run_label("results/runs/mt-grpo-s0/") == "mt-grpo"
    assert report.run_label("grpo-or_seed12") == "grpo-or"
    assert report.run_label("lr1e-5") == "lr1e-5"
    train = {"R_T": 0.0, "R_O": 0.0, "time_sample": 30.0, "time_score": 0.0, "time_update": 60.0}
    # two seeds of one method, one of another; seed 1 has an extra step-1 evaluation
    _write_log(tmp_path / "mt-s0", [_eval(0, 0.1, 0.2, time_eval=30.0), {"step": 1, **train}, {"step": 2, **train, **_eval(2, 0.3, 0.8, time_eval=30.0)}])
    _write_log(tmp_path / "mt-s1", [_eval(0, 0.1, 0.2), {"step": 1, **train, **_eval(1, 0.0, 0.0)}, {"step": 2, **train, **_eval(2, 0.5, 1.0)}])
    _write_log(tmp_path / "or-s0", [_eval(0, 0.1, 0.2), {"step": 1, **train}, {"step": 2, **train, **_eval(2, 0.2, 0.0)}])
    runs = [str(tmp_path / n) for n in ("mt-s0", "mt-s1", "or-s0")]
    steps, mean, lo, hi = report.across_seeds(report.group_runs(runs)["mt"], "eval_exact_match")
    assert steps == [0, 2]  # step 1 was evaluated in one seed only
    assert mean == pytest.approx([0.1, 0.4]) and lo == [0.1, 0.3] and hi == [0.1, 0.5]
    lines = report.results_table(runs).splitlines()
    assert lines[2] == "| base model | 3 | 0 | 0.200 | 1.000 | 0.500 | 0.100 | 0.100 | 0.500 | - |"
    # mt: mean of 0.8 and 1.0 tool calls, of 0.3 and 0.5 EM; wall time (30+60)*2 + 2*30 s = 4 min for seed 0, 3 min for seed 1
    assert lines[3] == "| mt | 2 | 2 | 0.900 (0.800-1.000) | 1.000 | 0.500 | 0.400 (0.300-0.500) | 0.400 (0.300-0.500) | 0.500 | 3.5 min |"
    assert lines[4] == "| or | 1 | 2 | 0.000 | 1.000 | 0.500 | 0.200 | 0.200 | 0.500 | 3.0 min |"
    _write_log(tmp_path / "late-s0", [_eval(0, 0.1, 0.2), {"step": 3, **train, **_eval(3, 0.2, 0.0)}])
    _write_log(tmp_path / "late-s1", [_eval(0, 0.1, 0.2), {"step": 2, **train, **_eval(2, 0.2, 0.0)}])
    with pytest.raises(ValueError, match="different steps"):
        report.results_table([str(tmp_path / "late-s0"), str(tmp_path / "late-s1")])
    # a seed still training (its config asks for 4 steps): the row is at the last step both evaluated
    _write_log(tmp_path / "go-s0", [_eval(0, 0.1, 0.2), _eval(2, 0.3, 1.0), _eval(4, 0.5, 1.0)])
    _write_log(tmp_path / "go-s1", [_eval(0, 0.1, 0.2), _eval(2, 0.1, 0.0), {"step": 3, **train}])
    for run in ("go-s0", "go-s1"):
        (tmp_path / run / "config.json").write_text(json.dumps({"steps": 4}))
    lines = report.results_table([str(tmp_path / "go-s0"), str(tmp_path / "go-s1")]).splitlines()
    assert lines[3].startswith("| go | 2 | 2 (in progress) | 0.500 (0.000-1.000) | 1.000 | 0.500 | 0.200 (0.100-0.300) |")
    _write_log(tmp_path / "go-s2", [_eval(0, 0.1, 0.2), {"step": 1, **train}])  # a seed just started
    (tmp_path / "go-s2" / "config.json").write_text(json.dumps({"steps": 4}))
    lines = report.results_table([str(tmp_path / f"go-s{i}") for i in range(3)]).splitlines()
    assert lines[3].startswith("| go | 3 | 0 (in progress) | 0.200 | 1.000 | 0.500 | 0.100 |")
    (tmp_path / "go-s1" / "config.json").write_text(json.dumps({"steps": 3}))  # both finished, at different steps
    with pytest.raises(ValueError, match="different steps"):
        report.results_table([str(tmp_path / "go-s0"), str(tmp_path / "go-s1")])


def test_results_table_has_the_hop_columns_when_every_evaluation_has_them(tmp_path):
    hops = {"eval_bridge_found": 0.25, "eval_search2_has_answer": 0.125}
    _write_log(tmp_path / "mt-s0", [_eval(0, 0.0, 0.5, **hops), _eval(10, 0.2, 1.0, eval_bridge_found=0.75,
                                                                     eval_search2_has_answer=0.5)])
    lines = report.results_table([str(tmp_path / "mt-s0")]).splitlines()
    assert lines[0].endswith("| format | search 1 found bridge | search 2 has answer | wall time / run |")
    assert lines[2] == "| base model | 1 | 0 | 0.500 | 1.000 | 0.500 | 0.000 | 0.000 | 0.500 | 0.250 | 0.125 | - |"
    assert lines[3].startswith("| mt | 1 | 10 | 1.000 | 1.000 | 0.500 | 0.200 | 0.200 | 0.500 | 0.750 | 0.500 |")
    _write_log(tmp_path / "or-s0", [_eval(0, 0.0, 0.5), _eval(10, 0.1, 1.0)])  # a one-hop run: no hop columns
    assert "bridge" not in report.results_table([str(tmp_path / "mt-s0"), str(tmp_path / "or-s0")])


def test_curves_table_has_every_evaluation_and_the_largest_late_drop(tmp_path):
    # a: 0.1, 0.4, 0.5 (step 20), 0.3, 0.45, 0.44: its fall into step 30 is before the window, 0.45 -> 0.44 in it
    _write_log(tmp_path / "a-s0", [_eval(s, em, 1.0) for s, em in zip(range(0, 60, 10), [0.1, 0.4, 0.5, 0.3, 0.45, 0.44])])
    # b: its only fall (0.4 -> 0.1) is before step 30, then it rises; it has no step-50 evaluation
    _write_log(tmp_path / "b-s1", [_eval(s, em, 1.0) for s, em in zip([0, 10, 20, 30, 40], [0.0, 0.4, 0.1, 0.2, 0.3])]
               + [{"step": 50, "tool_call_rate": 1.0}])
    lines = report.curves_table([str(tmp_path / "a-s0"), str(tmp_path / "b-s1")]).splitlines()
    assert lines[0] == "| run | step 0 | step 10 | step 20 | step 30 | step 40 | step 50 | largest drop from step 30 |"
    assert lines[2] == "| a-s0 | 0.100 | 0.400 | 0.500 | 0.300 | 0.450 | 0.440 | 0.010 |"
    assert lines[3] == "| b-s1 | 0.000 | 0.400 | 0.100 | 0.200 | 0.300 | - | 0.000 |"
    assert report.curves_table([str(tmp_path / "a-s0")], drops_from=20).endswith("| 0.440 | 0.200 |")  # 0.5 -> 0.3 counts
    assert report.curves_table([str(tmp_path / "a-s0")], drops_from=50).endswith("| 0.440 | - |")  # one late point: no fall


def test_seed_range_table_is_the_lowest_and_highest_seed_per_method(tmp_path):
    _write_log(tmp_path / "mt-s0", [_eval(0, 0.1, 1.0), _eval(10, 0.4, 1.0), _eval(20, 0.5, 1.0)])
    _write_log(tmp_path / "mt-s1", [_eval(0, 0.1, 1.0), _eval(10, 0.3, 1.0), _eval(20, 0.6, 1.0)])
    _write_log(tmp_path / "or-s0", [_eval(0, 0.1, 1.0), _eval(10, 0.2, 0.0)])  # still training: no step 20 yet
    _write_log(tmp_path / "or-s1", [_eval(0, 0.1, 1.0), _eval(10, 0.0, 0.0), _eval(20, 0.05, 0.0)])
    runs = [str(tmp_path / r) for r in ("mt-s0", "mt-s1", "or-s0", "or-s1")]
    lines = report.seed_range_table(runs).splitlines()
    assert lines[0] == "| method, lowest-highest seed | step 0 | step 10 | step 20 |"
    assert lines[2] == "| mt | 0.100-0.100 | 0.300-0.400 | 0.500-0.600 |"
    assert lines[3] == "| or | 0.100-0.100 | 0.000-0.200 | 0.050-0.050 (1 of 2) |"
    assert report.seed_range_table(runs, key="tool_call_rate").splitlines()[3].endswith("| 0.000-0.000 (1 of 2) |")
