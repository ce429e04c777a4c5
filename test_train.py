"""Tests of train.py (and precision.py, which it drives): train.update (old_logp, TIS,
dropout off), checkpoint/resume, a run killed before its first checkpoint, bf16 master
weights and checkpoints, the CLI's flags and defaults, questions_for_step, and one
end-to-end step with the real embedded model."""

import json
import math
import os
import shutil

import pytest
import torch

import checkpoint
import data
import logprobs
import models
import precision
import sampler
import tool_env
import train
from conftest import TEST_RUBRIC, in_dtype, run_scripted, run_update, train_main, two_groups


def train_args(tiny_path, out, steps, extra=(), device="cpu"):
    return ["--model", tiny_path, "--steps", str(steps), "--questions-per-step", "2", "--group-size", "2",
            "--max-turn-tokens", "12", "--output-dir", str(out), "--save-every", "1", "--lr", "1e-3",
            "--device", device, "--eval-every", "2", "--eval-questions", "2", *extra]


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(l) for l in f]


# ------------------------------------------------------------------ train.update


def test_old_logp_is_the_trainers_own_and_tis_corrects_the_sampler(tiny, tokenizer):
    """The sampler's log-probs are off by 0.3 on every token (as a bf16 sampler would be,
    a little): the ratio still starts at exactly 1, in every one of the mu iterations
    (lr 0, so pi_theta = pi_old), the mismatch is logged, and each token's term is
    weighted by w = min(e^0.3, C)."""
    model, _ = tiny
    eps, advs = two_groups(torch.Generator().manual_seed(2))
    b = logprobs.collate(eps, advs, tokenizer.pad_token_id)
    with torch.no_grad():
        logp, _ = logprobs.token_logprobs(model, b.input_ids, b.attention_mask)
    for r, e in enumerate(eps):
        e.sample_logp = [float(logp[r, j]) - 0.3 if m else 0.0 for j, m in enumerate(e.loss_mask)]
    n_tok = sum(sum(e.loss_mask) for e in eps)
    sum_a = sum(float(a.sum()) for a in advs)  # advantages are 0 off the loss mask
    for cap, w in ((2.0, math.exp(0.3)), (1.2, 1.2), (0.0, 1.0)):
        out, _ = run_update(model, eps, advs, ["--mu", "2", "--tis-cap", str(cap)], tokenizer.pad_token_id)
        assert out["ratio_min"] == pytest.approx(1.0, abs=1e-6) and out["ratio_max"] == pytest.approx(1.0, abs=1e-6)
        assert out["clip_frac"] == 0.0  # against the sampler's log-probs the ratio would be e^0.3 = 1.35: clipped
        assert out["logp_diff_mean"] == pytest.approx(0.3, abs=1e-5) and out["logp_diff_max"] == pytest.approx(0.3, abs=1e-5)
        assert out["loss"] == pytest.approx(-w * sum_a / n_tok, rel=1e-4)


def test_dropout_is_off_in_sampling_and_update(tiny_gpt2_dropout, tokenizer, tools):
    """A model with dropout, left in train mode: the sampler and the update both run it
    without dropout, so they agree, and the KL to a frozen copy is 0 before any update."""
    import copy

    model = tiny_gpt2_dropout.train()
    ids = torch.randint(0, 1000, (1, 30))
    assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)  # dropout is really on
    eps = run_scripted(model, tokenizer, tools, ["capital of Egypt", None, "Egypt", None])
    assert model.training  # the sampler restored the mode
    g = torch.Generator().manual_seed(0)
    advs = [torch.randn(len(e.token_ids), generator=g) * torch.tensor(e.loss_mask, dtype=torch.float) for e in eps]
    ref = copy.deepcopy(model).eval()
    out, _ = run_update(model, eps, advs, ["--mu", "1", "--beta", "0.1"], tokenizer.pad_token_id, ref_model=ref)
    assert out["logp_diff_max"] < 1e-5
    assert out["kl"] < 1e-9


# ------------------------------------------------------------------ training runs: checkpoints, resume, bf16


def test_spread_covers_the_split():
    assert data.spread(10, 4) == [0, 2, 5, 7]
    assert data.spread(3, 5) == [0, 1, 2]
    assert data.spread(6, 6) == [0, 1, 2, 3, 4, 5]


def test_checkpoint_then_resume_equals_uninterrupted(tiny, tmp_path, monkeypatch, capsys):
    _, path = tiny
    warm1 = ["--warmup-steps", "1"]  # so the cosine decay starts at step 2, inside the run
    assert train_main(train_args(path, tmp_path / "full", 3, warm1)) == 0
    out = capsys.readouterr().out  # the run ends with the held-out table: before (step 0) and after (step 3)
    assert "before and after training" in out and "step 0 " in out and "step 3 " in out
    assert train_main(train_args(path, tmp_path / "cut", 2, warm1)) == 0
    # "crash" after step 2, in the worst places: between save_checkpoint's two renames
    # (only checkpoint.old and a half checkpoint.tmp left) and while writing a log line
    cut_dir = tmp_path / "cut"
    os.replace(cut_dir / "checkpoint", cut_dir / "checkpoint.old")
    (cut_dir / "checkpoint.tmp").mkdir()
    with open(cut_dir / "log.jsonl", "a") as f:
        f.write('{"step": 3, "tool_execu')
    # a changed setting is refused, naming it (the old optimizer state would keep the old lr)
    with pytest.raises(SystemExit, match=r"--lr 0.001 -> 0.01"):
        train_main(train_args(path, cut_dir, 3, warm1 + ["--resume", "--lr", "1e-2"]))
    # resume to step 3 (--steps may change)
    assert train_main(train_args(path, tmp_path / "cut", 3, warm1 + ["--resume"])) == 0
    assert not (cut_dir / "checkpoint.old").exists() and not (cut_dir / "checkpoint.tmp").exists()
    full, cut = read_log(tmp_path / "full"), read_log(tmp_path / "cut")
    # step 0: the evaluation before training, logged once (not again on --resume)
    assert [r["step"] for r in cut] == [0, 1, 2, 3]
    assert full[0] == {**cut[0], "time_eval": full[0]["time_eval"]} and "loss" not in full[0]
    # evaluations: before training, every 2 steps, and at the last step (3) whatever --eval-every says
    assert sorted(os.listdir(tmp_path / "cut" / "evals")) == [
        "step0000.json", "step0000.trajectories.jsonl", "step0002.json", "step0002.trajectories.jsonl",
        "step0003.json", "step0003.trajectories.jsonl"]
    full, cut = full[1:], cut[1:]
    # the schedule ends at --lr-decay-steps (60), not at --steps: the 2-step sitting did not
    # decay to the floor at its step 2, so the resumed run's lrs are the uninterrupted one's
    assert [r["lr"] for r in cut] == [r["lr"] for r in full] == pytest.approx(
        [1e-3, 1e-3 * train.lr_factor(1, 1, 60, "cosine", 0.1), 1e-3 * train.lr_factor(2, 1, 60, "cosine", 0.1)])
    assert all(r["trained_episodes"] > 0 and r["grad_norm"] > 0 for r in full)  # real updates happened
    for key in ("loss", "R_O", "sampled_tokens", "entropy", "grad_norm", "clip_frac"):
        assert cut[2][key] == full[2][key], key
    assert cut[1]["loss"] == full[1]["loss"]
    # greedy evaluation every 2 steps, logged on the same line
    assert "eval_exact_match" in full[1] and "eval_exact_match" not in full[0]
    assert 0.0 <= full[1]["eval_tool_call_rate"] <= 1.0
    # the checkpoint loads with plain transformers
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "cut" / "checkpoint")
    # its model card: the held-out evaluations and a command that gives back the run's settings
    card = (cut_dir / "checkpoint" / "README.md").read_text()
    assert "for 3 of 3 steps" in card and "| 0 | " in card and "| 3 | " in card
    command = card.strip().splitlines()[-1].split()
    assert command[:2] == ["python", "train.py"]
    expected = {**vars(train.parse_args(train_args(path, cut_dir, 3, warm1))), "device": None}
    assert vars(train.parse_args(command[2:] + ["--output-dir", str(cut_dir)])) == expected
    # a finished run is not silently overwritten
    with pytest.raises(SystemExit, match="already has a run"):
        train_main(train_args(path, tmp_path / "cut", 3))


def test_lr_factor_warms_up_then_decays_to_the_floor_and_stays():
    f = train.lr_factor
    # warm-up over 5 optimizer steps: 1/5 ... 5/5
    assert [f(s, 5, 60, "cosine", 0.1) for s in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    # after it, t = (step - 5) / (60 - 5 - 1): 0 at step 5, 1/3 at step 23, 1 at step 59 (the last)
    assert f(5, 5, 60, "cosine", 0.1) == 1.0
    assert f(23, 5, 60, "cosine", 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + 0.5))  # cos(pi/3) = 0.5: 0.775
    assert f(23, 5, 60, "linear", 0.1) == pytest.approx(1 - 0.9 / 3)  # 0.7
    assert f(59, 5, 60, "cosine", 0.1) == pytest.approx(0.1) and f(59, 5, 60, "linear", 0.1) == pytest.approx(0.1)
    assert f(80, 5, 60, "cosine", 0.1) == pytest.approx(0.1)  # past --lr-decay-steps: the floor
    assert f(40, 5, 60, "constant", 0.1) == 1.0
    # the default 30-step run is the first half of the 60-step schedule: at its last step the lr is
    # still above half its peak (cos(pi * 24/54)), not at the floor as a 30-step decay would be
    assert train.parse_args([]).lr_decay_steps == 60 and train.parse_args([]).steps == 30
    assert f(29, 5, 60, "cosine", 0.1) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 24 / 54)))
    assert f(29, 5, 30, "cosine", 0.1) == pytest.approx(0.1)


def test_a_run_saved_before_demo_resumes_with_the_jp_demonstration(tmp_path):
    """--demo's default is recipe v5's jp+lake; a run whose config.json predates the flag
    was trained with '.jp' alone and must go on with it when resumed (and be evaluated
    with it: test_evaluate), while a run that saved its demo keeps what it saved."""
    assert train.parse_args([]).demo == tool_env.DEFAULT_DEMO == "jp+lake"
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir(), new.mkdir()
    (old / "config.json").write_text(json.dumps({"method": "mt-grpo"}))
    (new / "config.json").write_text(json.dumps({"method": "mt-grpo", "demo": "jp+lake"}))
    assert train.parse_args(["--resume", "--output-dir", str(old)]).demo == "jp"
    assert train.parse_args(["--output-dir", str(old)]).demo == "jp+lake"  # not resumed: a new run's default
    assert train.parse_args(["--resume", "--output-dir", str(new)]).demo == "jp+lake"


def test_a_checkpoint_saved_on_cuda_resumes_on_the_cpu(tiny, tmp_path, monkeypatch, capsys):
    """--device may change on resume. A checkpoint written on a GPU holds CUDA tensors
    (the optimizer state) and a CUDA generator's state (16 bytes: seed and offset, which
    a CPU generator refuses). Made here by saving with CUDA location tags: it resumes on
    the CPU, reseeds the sampling generator with a one-line note, and says nothing about
    deleting the (good) checkpoint."""
    import torch.serialization

    _, path = tiny
    out = tmp_path / "run"
    quick = ["--eval-every", "0", "--probe-questions", "0"]
    assert train_main(train_args(path, out, 1, quick)) == 0
    file = out / "checkpoint" / "trainer_state.pt"
    state = torch.load(file, weights_only=False)
    state["rng"][0].update(generator=torch.tensor([0] * 16, dtype=torch.uint8), generator_device="cuda")
    with monkeypatch.context() as m:  # every storage tagged as on cuda:0, as a GPU run writes them
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(state, file)
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.load(file, weights_only=False)  # what loading it without map_location does here
    capsys.readouterr()
    assert train_main(train_args(path, out, 2, [*quick, "--resume"])) == 0
    printed = capsys.readouterr().out
    assert "delete" not in printed
    notes = [line for line in printed.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "sampled on cuda, this run samples on cpu" in notes[0]
    assert [r["step"] for r in read_log(out)] == [1, 2]


def test_a_run_resumed_where_auto_resolves_otherwise_says_so(tiny, tmp_path, monkeypatch, capsys):
    """--precision auto follows the machine, and a run may resume on another one (a
    bf16 CPU, then one without bf16 units): the run goes on in what auto resolves to
    there, with one note, and each log line names the precision its step trained in."""
    _, path = tiny
    out = tmp_path / "run"
    quick = ["--eval-every", "0", "--probe-questions", "0"]
    for bf16_units, steps in ((True, 1), (False, 2)):
        monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: bf16_units)
        capsys.readouterr()
        assert train_main(train_args(path, out, steps, [*quick, "--resume"] if steps > 1 else quick)) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "up to 1 trained in bf16" in notes[0] and "goes on in fp32" in notes[0]
    assert [(r["step"], r["precision"]) for r in read_log(out)] == [(1, "bf16"), (2, "fp32")]
    assert json.loads((out / "config.json").read_text())["resolved_precision"] == "fp32"


def test_a_run_killed_before_its_first_checkpoint_starts_over(tiny, tmp_path, monkeypatch, capsys):
    _, path = tiny
    out = tmp_path / "run"
    (out / "evals").mkdir(parents=True)  # what a kill during step 1 leaves: the step-0 evaluation, no checkpoint
    (out / "log.jsonl").write_text('{"step": 0, "eval_exact_match": 0.5}\n')
    (out / "evals" / "step0000.json").write_text("{}")
    for extra in ([], ["--resume"]):  # a plain rerun and --resume both start over
        assert train_main(train_args(path, out, 1, extra)) == 0
        assert "starting over" in capsys.readouterr().out
        assert [r["step"] for r in read_log(out)] == [0, 1] and read_log(out)[0]["eval_exact_match"] != 0.5
        shutil.rmtree(out / "checkpoint")  # back to "no checkpoint" for the next round
    # --log tensorboard: the same scalars to OUTPUT_DIR/tb, or one clear line without the package
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(SystemExit, match="pip install tensorboard"):
            train_main(train_args(path, tmp_path / "tb", 1, ["--log", "tensorboard"]))
    else:
        assert train_main(train_args(path, tmp_path / "tb", 1, ["--log", "tensorboard"])) == 0
        assert any(n.startswith("events.out.tfevents") for n in os.listdir(tmp_path / "tb" / "tb"))


def test_collect_grads_sums_bf16_gradients_in_float32():
    """Three backward passes' bf16 gradients, one of them sparse (a tied embedding's, as
    logprobs.lean_backward makes it), land in the float32 master .grad as the exact float32
    sum, and the model's own .grad is freed after each."""
    model = torch.nn.Linear(4, 3, bias=False)
    master = precision.MasterWeights(model, "bf16")
    g = [torch.tensor([[1.0, 2 ** -8, 3.0, 0.0]] * 3), torch.tensor([[2 ** -8] * 4] * 3)]
    g = [x.bfloat16() for x in g]
    rows = torch.sparse_coo_tensor([[1]], torch.tensor([[2 ** -9, 0.5, 0.0, 1.0]]).bfloat16(), (3, 4))
    for grad in (g[0], g[1], rows):
        model.weight.grad = grad
        master.collect_grads()
        assert model.weight.grad is None
    expected = g[0].float() + g[1].float() + rows.to_dense().float()
    assert torch.equal(master.params[0].grad, expected) and master.params[0].grad.dtype == torch.float32
    # the small terms are kept: a bf16 sum (spacing 2^-7 at 1) would round 1 + 2^-8 to 1
    assert float(master.params[0].grad[0, 0]) == 1 + 2 ** -8 and float(master.params[0].grad[1, 0]) == 1 + 2 ** -8 + 2 ** -9
    assert float((g[0] + g[1])[0, 0]) == 1.0


def test_add_float_casts_in_slices_of_rows_with_the_same_sum():
    """A dense gradient larger than the chunk is cast and added slice by slice: with a
    chunk of 8 elements, a 5 x 3 gradient goes in slices of 2, 2 and 1 rows, and every row
    gets its own value added once: the float32 sum is exact, so a slice skipped, repeated
    or shifted would show."""
    src = (torch.arange(15, dtype=torch.float32).reshape(5, 3) * 2 ** -7 + 1).bfloat16()  # exact in bf16
    dst = torch.full((5, 3), 2 ** -9)
    precision.add_float(dst, src, chunk=8)
    expected = torch.arange(15, dtype=torch.float32).reshape(5, 3) * 2 ** -7 + 1 + 2 ** -9
    assert torch.equal(dst, expected)  # exact: 1 + k/128 + 1/512 needs 10 bits, float32 has 24
    ones = torch.full((5, 3), 2 ** -9)
    precision.add_float(ones, src, chunk=1)  # a chunk below one row: one row per slice
    assert torch.equal(ones, expected)


def test_bf16_master_weights_keep_updates_that_bf16_rounds_away(tiny):
    """One AdamW step at lr 1e-6 (Adam's first step moves every weight by ~lr): updating
    bf16 weights directly loses nearly all of it (bf16 spacing near 0.02 is 1.2e-4); the
    float32 master weights keep all of it, and the bf16 model is their rounding."""
    import copy

    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))

    def step(model, params):
        model(input_ids=ids, labels=ids).loss.backward()
        if master is not None:
            master.collect_grads()
        torch.optim.AdamW(params, lr=1e-6).step()

    master = None
    old = in_dtype(tiny[0], torch.bfloat16)
    before = [p.detach().clone() for p in old.parameters()]
    step(old, list(old.parameters()))
    changed_old = sum(int((p != b).sum()) for p, b in zip(old.parameters(), before)) / sum(b.numel() for b in before)

    model = copy.deepcopy(tiny[0])
    master = precision.MasterWeights(model, "bf16")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters()) and all(m.dtype == torch.float32 for m in master.params)
    before = [m.detach().clone() for m in master.params]
    step(model, master.params)
    assert all(p.grad is None for p in model.parameters()) and all(m.grad.dtype == torch.float32 for m in master.params)
    master.push()
    delta = torch.cat([(m.detach() - b).flatten() for m, b in zip(master.params, before)]).abs()
    assert changed_old < 0.05
    assert float((delta > 0).float().mean()) > 0.95 and float(delta.max()) < 1.1e-6  # float32 spacing at 1.0 (norm weights): 1.2e-7
    for p, m in zip(model.parameters(), master.params):
        assert torch.equal(p, m.to(torch.bfloat16))
    sd = master.state_dict()
    assert all(t.dtype == torch.float32 for t in sd.values())
    assert sd["lm_head.weight"].data_ptr() == sd["model.embed_tokens.weight"].data_ptr()  # tied weights stay tied


def test_bf16_training_checkpoints_float32_master_weights(tiny, tmp_path, monkeypatch, device):
    _, path = tiny
    out = tmp_path / "bf16"
    assert train_main(train_args(path, out, 2, ["--precision", "bf16", "--lr", "1e-6", "--eval-every", "0"], device)) == 0
    assert json.loads((out / "config.json").read_text())["resolved_precision"] == "bf16"
    from transformers import AutoModelForCausalLM

    init = AutoModelForCausalLM.from_pretrained(path).state_dict()
    saved = AutoModelForCausalLM.from_pretrained(out / "checkpoint").state_dict()  # the config says float32
    w, w0 = saved["model.layers.0.mlp.up_proj.weight"], init["model.layers.0.mlp.up_proj.weight"]
    assert w.dtype == torch.float32
    assert float((w != w0).float().mean()) > 0.9  # nearly every weight moved at lr 1e-6 ...
    # ... by about lr per optimizer step: 2 steps x mu 2 = 4 Adam steps of at most ~lr
    # each (a bound, not an equality: |m_hat / sqrt(v_hat)| can exceed 1 a little)
    assert float((w - w0).abs().max()) < 4 * 1e-6 * 1.1
    assert float((w.to(torch.bfloat16).float() != w).float().mean()) > 0.9  # not a bf16 model's weights
    # resume continues from the float32 master weights
    assert train_main(train_args(path, out, 3, ["--precision", "bf16", "--lr", "1e-6", "--eval-every", "0", "--resume"], device)) == 0
    assert [r["step"] for r in read_log(out)] == [0, 1, 2, 3]  # step 0: the probe of the initial policy


def test_bf16_training_model_is_the_model_a_bf16_load_gives(tiny):
    """MasterWeights casts the parameters only: its bf16 model has the buffers (rotary
    inv_freq, float32) and the logits of the same weights loaded with dtype=bf16, as
    evaluate.py loads them."""
    import copy

    model, path = tiny
    trained = copy.deepcopy(model)
    precision.MasterWeights(trained, "bf16")
    loaded, _ = models.load_model(path, "cpu", torch.bfloat16)
    mine, theirs = dict(trained.named_buffers()), dict(loaded.named_buffers())
    assert mine.keys() == theirs.keys() and "model.rotary_emb.inv_freq" in mine
    for name, b in theirs.items():
        assert mine[name].dtype == b.dtype and torch.equal(mine[name], b), name
    ids = torch.randint(0, 1000, (2, 300), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(trained(input_ids=ids).logits, loaded(input_ids=ids).logits)


def test_bf16_in_training_evaluation_equals_evaluate_py(tiny, tmp_path, monkeypatch):
    """The greedy evaluation train.py logs and evaluate.py's scoring of the checkpoint it
    saved at that step score one policy: the same metrics and the same trajectories, down
    to every sampled token's log-prob (added to both's trajectory records here: a bf16
    inv_freq moves the tiny model's log-probs without flipping its greedy tokens).
    evaluate.py is given the run alone: task, corpus, split, the spread of its questions
    and the rollout settings all come from the run's config.json."""
    import evaluate

    _, path = tiny
    records = evaluate.trajectory_records
    monkeypatch.setattr(evaluate, "trajectory_records", lambda name, eps: [
        {**r, "token_ids": e.token_ids, "sample_logp": e.sample_logp} for r, e in zip(records(name, eps), eps)])
    task = ["--task", "triviaqa:fixtures/triviaqa", "--corpus", "fixtures/triviaqa/corpus.jsonl"]
    out = tmp_path / "run"
    assert train_main(train_args(path, out, 1, [*task, "--precision", "bf16", "--eval-every", "1", "--eval-split",
                                                "train", "--eval-questions", "2", "--max-turn-tokens", "24",
                                                "--probe-questions", "0"])) == 0
    assert evaluate.main(["--model", str(out), "--precision", "bf16", "--device", "cpu", "--out", str(tmp_path / "eval")],
                         rubric=TEST_RUBRIC) == 0
    logged = json.loads((out / "evals" / "step0001.json").read_text())["results"]
    scored = json.loads((tmp_path / "eval.json").read_text())["results"][str(out)]
    assert {k: scored[k] for k in logged} == logged

    def trajectories(file):
        return [{k: v for k, v in json.loads(line).items() if k != "model"} for line in open(file)]

    assert trajectories(out / "evals" / "step0001.trajectories.jsonl") == trajectories(tmp_path / "eval.trajectories.jsonl")


def test_precision_auto_follows_the_hardware_check(monkeypatch):
    assert precision.resolve("fp32", "cuda") == "fp32" and precision.resolve("bf16", "cpu") == "bf16"
    for amx, avx512bf16, want in ((True, False, "bf16"), (False, True, "bf16"), (False, False, "fp32")):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512bf16, raising=False)
        assert precision.resolve("auto", "cpu") == want
    with pytest.raises(ValueError, match="unknown precision"):
        precision.resolve("fp16", "cpu")


# ------------------------------------------------------------------ the command line


def test_fewshot_is_on_by_default_for_the_embedded_model_only():
    assert train.parse_args([]).fewshot is True
    assert train.parse_args(["--no-fewshot"]).fewshot is False  # the paper's prompt, one flag away
    assert train.parse_args(["--model", "Qwen/Qwen2.5-7B"]).fewshot is False
    assert train.parse_args(["--model", "Qwen/Qwen2.5-7B", "--fewshot"]).fewshot is True


def test_train_cli_rejects_bad_flags(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--group-size", "1"])
    assert "--group-size must be at least 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.parse_args(["--contains-max-extra-words", "-1"])
    assert "--contains-max-extra-words must be 0 or more" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.parse_args(["--contains-max-extra-words", "one"])
    assert "invalid count_or_none value: 'one'" in capsys.readouterr().err
    # recipe v3's limit is the default; 'none' is the paper's unlimited contains_answer
    assert train.parse_args([]).contains_max_extra_words == 1
    assert train.parse_args(["--contains-max-extra-words", "none"]).contains_max_extra_words is None
    # --resume where nothing was saved yet starts the run (a driver can always pass --resume)
    assert checkpoint.prepare_output_dir(train.parse_args(["--resume", "--output-dir", str(tmp_path / "none")])) is None


def test_questions_for_step_is_a_seeded_permutation():
    seen = [i for s in range(5) for i in train.questions_for_step(10, s, 2, seed=7)]
    assert sorted(seen) == list(range(10))  # one epoch covers every question once
    assert train.questions_for_step(10, 3, 2, 7) == train.questions_for_step(10, 3, 2, 7)
    assert train.questions_for_step(10, 0, 2, 7) != train.questions_for_step(10, 0, 2, 8)


# ------------------------------------------------------------------ the real embedded model


def test_real_model_end_to_end_one_step(tmp_path, device):
    out = tmp_path / "run"
    args = ["--steps", "1", "--group-size", "2", "--questions-per-step", "2", "--max-turn-tokens", "32",
            "--output-dir", str(out), "--device", device, "--fewshot", "--eval-every", "0",
            "--mu", "2"]  # a second optimizer step on the batch: its ratios can clip (clip_frac)
    assert train.main(args) == 0
    start, rec = read_log(out)
    for key in ("R_T", "R_O", "exact_match", "format", "tool_call_rate", "tool_success", "clip_frac", "kl",
                "adv_turn1", "time_sample", "time_update", "loss", "sampled_tokens", "probe_kl_mean", "probe_kl_max"):
        assert key in rec and math.isfinite(rec[key]), key
    # the probe (probe.py) read the policy before and after the update, on the real model's prompts
    for r in (start, rec):
        assert 0 < r["probe_second_call"] < 1 and 0 < r["probe_answer_prob"] < 1
        assert r["probe_second_call"] + r["probe_answer_prob"] <= 1 + 1e-6
    assert rec["probe_kl_max"] >= rec["probe_kl_mean"] >= 0
    # entropy is measured on the episodes that were trained (those with a non-zero advantage)
    assert (rec["entropy"] is None) == (rec["trained_episodes"] == 0)
    # sampler vs trainer log-probs of the trained tokens: float32 agrees within 1e-4 (a bf16
    # run, where the hardware makes it the default, within the measured 0.28 and some margin)
    if rec["trained_episodes"]:
        prec = json.loads((out / "config.json").read_text())["resolved_precision"]
        assert rec["logp_diff_max"] < {"fp32": 1e-3, "bf16": 1.0}[prec]
    else:
        assert rec["logp_diff_max"] is None
    assert os.path.exists(out / "checkpoint" / "model.safetensors")
    # on a GPU the step's peak memory, per phase, for memory_plan.py to be read against
    cuda = device.startswith("cuda")
    assert ("memory_sample_gib" in rec) == ("memory_update_gib" in rec) == cuda
    if cuda:
        assert 0 < rec["memory_sample_gib"] < 80 and 0 < rec["memory_update_gib"] < 80


def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["-h"])
    out = " ".join(capsys.readouterr().out.split())
    # flags without a help text too (argparse's own formatter shows nothing for them)
    for flag, default in (("--steps STEPS", "30"), ("--eps EPS", "0.2"), ("--mu MU", "1"), ("--top-k TOP_K", "50")):
        assert f"{flag} " in out and out.split(f"{flag} ", 2)[-1].split("--")[0].strip().endswith(f"(default: {default})"), flag


def test_episode_stats_logs_words_per_answer():
    """answer_words: the mean normalized word count of the final answers, over the episodes
    that answered ("The Mt. Fogo." is 2 words, "I say it is Praia" 5; no answer: not counted)."""
    import rewards
    from conftest import chat

    row = {"question_id": "q", "answer": {"aliases": ["Praia"]}}
    eps = [sampler.Episode(row, chat(f"<reasoning>r</reasoning>\n<answer>{a}</answer>")) for a in ("The Mt. Fogo.", "I say it is Praia")]
    eps.append(sampler.Episode(row, chat('<reasoning>r</reasoning>\n<tool>{"name": "x", "args": {}}</tool>')))
    for e in eps:
        rewards.PAPER_RUBRIC.score(e)
    assert train.episode_stats(eps)["answer_words"] == pytest.approx(3.5)


@pytest.mark.parametrize("module, setting, huge", [("train", None, True), ("train", "0", False), ("bench", None, True)])
def test_train_puts_big_cpu_tensors_on_huge_pages_unless_told_not_to(module, setting, huge):
    """train.py sets THP_MEM_ALLOC_ENABLE before torch allocates its first tensor (the allocator
    reads it once; bench.py, which times train.py's update, gets it by importing train before
    it makes a tensor), and a user's own setting wins. With it on, PyTorch's CPU
    allocator aligns every tensor of 2 MB or more to a page (to madvise it onto huge
    pages); without it, to 64 bytes only, so 8 page-aligned tensors in a row say it is on."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if setting is not None:
        env["THP_MEM_ALLOC_ENABLE"] = setting
    code = (f"import {module}, torch; xs = [torch.empty(2**20 + 7) for _ in range(8)]; "
            "print(all(x.data_ptr() % 4096 == 0 for x in xs))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.abspath(__file__)), timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == str(huge)
