"""Several processes (torchrun, gloo on CPU): the same global batch gives the same update
as one process, and a torchrun training run logs one line per step."""

import json
import os
import socket
import subprocess
import sys

import torch
import torch.multiprocessing as mp

HERE = os.path.dirname(os.path.abspath(__file__))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _update_worker(rank: int, world: int, port: int, tiny_path: str, out: str) -> None:
    """One process of a 2-process update: group `rank` of the two groups of episodes."""
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from conftest import run_update, two_groups

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = AutoModelForCausalLM.from_pretrained(tiny_path).eval()
    eps, advs = two_groups(torch.Generator().manual_seed(0))  # the same on every process
    mine = slice(3 * rank, 3 * rank + 3)  # G = 3: this process's question
    upd, grads = run_update(model, eps[mine], advs[mine], ["--micro-batch-tokens", "40"], 0)
    torch.save({"loss": upd["loss"], "grads": grads}, f"{out}.{rank}")
    dist.destroy_process_group()


def test_two_processes_give_the_update_of_one(tiny, tmp_path):
    from conftest import run_update, two_groups

    model, path = tiny
    eps, advs = two_groups(torch.Generator().manual_seed(0))
    one, grads = run_update(model, eps, advs, ["--micro-batch-tokens", "40"], 0)
    out = str(tmp_path / "grads")
    mp.spawn(_update_worker, args=(2, _free_port(), path, out), nprocs=2, join=True)
    parts = [torch.load(f"{out}.{r}") for r in range(2)]
    # each process's loss is its share of one global mean (the normalizer counts both)
    assert abs(parts[0]["loss"] + parts[1]["loss"] - one["loss"]) < 1e-5
    for r in range(2):  # after the all-reduce every process holds the whole batch's gradient
        for g, g1 in zip(parts[r]["grads"], grads):
            torch.testing.assert_close(g, g1, atol=1e-6, rtol=1e-4)


def test_torchrun_training_logs_one_line_per_step(tiny, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "train.py", "--model", tiny[1], "--steps", "2", "--questions-per-step", "2", "--group-size", "2",
           "--max-turn-tokens", "8", "--eval-every", "2", "--eval-questions", "2", "--device", "cpu",
           "--save-every", "1", "--output-dir", str(out)]
    p = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-2000:]
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["step"] for r in log] == [0, 1, 2]  # rank 0 alone writes
    assert all(r["turns"] >= 1 for r in log[1:]) and log[2]["eval_episodes"] == 2
    assert all(r["episodes"] == 4 for r in log[1:])  # each line covers both processes: 2 questions x G = 2
    assert json.load(open(out / "config.json"))["processes"] == 2
    state = torch.load(out / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert state["step"] == 2 and len(state["rng"]) == 2  # every process's random state, for --resume
