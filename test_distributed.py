"""Several processes (torchrun, gloo on CPU): the same global batch gives the same update
as one process, and a torchrun training run logs one line per step."""

import json
import os
import socket
import subprocess
import sys

import pytest
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
    import train

    dist.init_process_group("gloo", rank=rank, world_size=world)
    calls, all_reduce = [], dist.all_reduce
    train.dist.all_reduce = lambda t, *a, **k: calls.append(t.numel()) or all_reduce(t, *a, **k)
    model = AutoModelForCausalLM.from_pretrained(tiny_path).eval()
    eps, advs = two_groups(torch.Generator().manual_seed(0))  # the same on every process
    mine = slice(3 * rank, 3 * rank + 3)  # G = 3: this process's question
    upd, grads = run_update(model, eps[mine], advs[mine], ["--micro-batch-tokens", "40", "--mu", "2"], 0)
    torch.save({"upd": upd, "grads": grads, "all_reduce_calls": len(calls)}, f"{out}.{rank}")
    dist.destroy_process_group()


def test_two_processes_give_the_update_of_one(tiny, tmp_path):
    from conftest import run_update, two_groups

    model, path = tiny
    eps, advs = two_groups(torch.Generator().manual_seed(0))
    one, grads = run_update(model, eps, advs, ["--micro-batch-tokens", "40", "--mu", "2"], 0)
    out = str(tmp_path / "grads")
    mp.spawn(_update_worker, args=(2, _free_port(), path, out), nprocs=2, join=True)
    parts = [torch.load(f"{out}.{r}") for r in range(2)]
    # every process reports the statistics of the whole update (train.reduce_update_stats):
    # the loss (each process's is its share of one global mean), the token means, the
    # extremes and the counts are those of one process with all the episodes
    assert one["trained_episodes"] == 6 and one["logp_diff_max"] > 0 and one["is_weight_min"] < 1
    for p in parts:
        upd = p["upd"]
        assert upd.keys() == one.keys()
        for k, v in one.items():
            assert upd[k] == (v if v is None or isinstance(v, int) else pytest.approx(v, rel=1e-5, abs=1e-9)), k
    # mu = 2 optimizer steps, each: which parameters were touched, then one bucket of gradients
    assert all(p["all_reduce_calls"] == 2 * 2 for p in parts)
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


class FakeNccl:
    """A 2-process world simulated by two threads, for train.sum_gradients: all_reduce
    sums over the threads, records every tensor's device, and refuses a CPU tensor as
    NCCL does (it has no CPU backend).

    The threads take turns: one holds `turn` while it computes and lets go only while it
    waits for the other at a barrier. Torch's lazy device is not safe to use from two
    threads at once (CI saw a segmentation fault), and real processes never share it."""

    def __init__(self, world=2):
        import threading

        self.world, self.local = world, threading.local()
        self.barrier, self.slots, self.calls = threading.Barrier(world), {}, []
        self.turn = threading.Lock()

    def wait(self):
        """Meet the other threads at the barrier, letting go of the turn meanwhile."""
        self.turn.release()
        try:
            self.barrier.wait()
        finally:
            self.turn.acquire()

    def rank(self):
        return self.local.rank, self.world

    def all_reduce(self, t):
        if t.device.type == "cpu":
            raise RuntimeError("No backend type associated with device type cpu")  # NCCL's error
        n = self.local.n = getattr(self.local, "n", 0) + 1  # this process's n-th collective
        self.calls.append((self.local.rank, t.device.type, t.numel()))
        self.slots[n, self.local.rank] = t.clone()
        self.wait()
        t.copy_(sum(self.slots[n, r] for r in range(self.world)))
        self.wait()  # everyone has read slot n

    def run(self, fn, *args):
        """fn(rank, *args) on each simulated process; their results in rank order."""
        import threading

        out, errors = [None] * self.world, []

        def body(rank):
            self.local.rank = rank
            with self.turn:
                try:
                    out[rank] = fn(rank, *args)
                except Exception as e:  # noqa: BLE001: reported below
                    errors.append(e)
                    self.barrier.abort()

        threads = [threading.Thread(target=body, args=(r,)) for r in range(self.world)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        if errors:
            raise errors[0]
        return out


def test_sum_gradients_keeps_tensors_on_the_device_and_sends_few_buckets(tiny, monkeypatch):
    """NCCL (torchrun on GPUs) refuses CPU tensors: with the parameters on a non-CPU
    device (torch's lazy device, which runs on the CPU), every tensor handed to
    all_reduce is on that device, the tiny model's gradients travel in one bucket (plus
    the all-reduce of which parameters were touched), and the sums are right, with
    parameters touched by one process only (zeros from the other) or by none (grad None)."""
    import train

    pytest.importorskip("torch._lazy.ts_backend", reason="this torch build has no lazy device").init()
    fake = FakeNccl()
    monkeypatch.setattr(train, "world", fake.rank)
    monkeypatch.setattr(train.dist, "all_reduce", fake.all_reduce)
    shapes = [p.shape for p in tiny[0].parameters()]
    g = torch.Generator().manual_seed(0)
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(2)]
    skip = [{1}, {1, 2}]  # parameter 1: no process touched it; parameter 2: only rank 0

    def step(rank, bucket):
        params = [torch.nn.Parameter(torch.zeros(s, device="lazy")) for s in shapes]
        for i, (p, gr) in enumerate(zip(params, grads[rank])):
            p.grad = None if i in skip[rank] else gr.to("lazy")
        train.sum_gradients(params, **bucket)
        return [None if p.grad is None else p.grad.cpu() for p in params]

    for bucket, n_calls in (({}, 2), ({"bucket_elements": 10_000}, None)):
        fake.calls.clear()
        out = fake.run(step, bucket)
        assert {d for _, d, _ in fake.calls} == {"lazy"}
        per_rank = len(fake.calls) // 2
        if n_calls:
            assert per_rank == n_calls  # the touched flags, then one bucket of every gradient
        else:  # small buckets: still far fewer calls than parameters, each within the bucket size
            biggest = max(s.numel() for s in shapes)  # a parameter larger than a bucket travels alone
            assert 2 < per_rank < len(shapes) and all(n <= max(10_000, biggest) for _, _, n in fake.calls[2:])
        for grads_r in out:
            assert grads_r[1] is None
            torch.testing.assert_close(grads_r[2], grads[0][2])
            for i in set(range(len(shapes))) - {1, 2}:
                torch.testing.assert_close(grads_r[i], grads[0][i] + grads[1][i])


# ------------------------------------------------------------------ --fsdp (sharding.py)

def _three_groups():
    """Three questions x G = 3 (one with only one trained rollout): process 0 trains
    questions 2 (two micro-batches) and 0 (one), process 1 question 1 (one), so process 1
    pads its group with an idle micro-batch and adds a group of one idle micro-batch
    (sharding.lockstep_plan)."""
    from conftest import two_groups

    eps, advs = two_groups(torch.Generator().manual_seed(0), prompt_lens=(20, 25, 22))
    advs[4].zero_(), advs[5].zero_()
    return eps, advs, {0: [6, 7, 8, 0, 1, 2], 1: [3, 4, 5]}


def _adamw_update(model, master, episodes, advs):
    """train.update with AdamW at lr 1e-3 (mu = 2 steps, gradients clipped at 0.1), TIS off."""
    import sampler
    import train

    opt = train.make_optimizer(master.params, 1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    args = vars(train.parse_args(["--temperature", "1", "--micro-batch-tokens", "40", "--tis-cap", "0", "--mu", "2"]))
    return train.update(model, master, opt, sched, episodes, advs, train.UpdateConfig.from_dict(args), 0)


def _fsdp_worker(rank: int, world: int, port: int, tiny_path: str, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conftest import CORPUS, Q

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import sampler
    import sharding
    import tool_env

    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = AutoModelForCausalLM.from_pretrained(tiny_path).eval()
    sharding.wrap(model, "fp32", mesh=init_device_mesh("cpu", (world,)))
    # sampling: every unit all-gathered once, however many tokens are decoded
    name = "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"  # FSDP's
    gathers, all_gather = [], getattr(dist, name)
    setattr(dist, name, lambda *a, **k: gathers.append(1) or all_gather(*a, **k))
    cfg = sampler.RolloutConfig(max_turn_tokens=6, temperature=1.0, top_k=0)
    with sharding.gathered(model):
        episodes = sampler.sample_episodes(model, AutoTokenizer.from_pretrained(tiny_path), Q[rank:rank + 1],
                                           tool_env.ToolEnv(tool_env.make_tools(CORPUS)), 2, cfg,
                                           torch.Generator().manual_seed(rank))
    setattr(dist, name, all_gather)
    eps, advs, share = _three_groups()
    idle, idle_pass = [], sharding.idle_pass
    sharding.idle_pass = lambda *a: idle.append(1) or idle_pass(*a)
    upd = _adamw_update(model, sharding.ShardedWeights(model), [eps[i] for i in share[rank]],
                        [advs[i] for i in share[rank]])
    state = sharding.full_state_dict(model)  # on rank 0
    idle_passes = [None] * world
    dist.all_gather_object(idle_passes, len(idle))
    if rank == 0:
        torch.save({"upd": upd, "state": state, "gathers": len(gathers), "units": len(sharding.units(model)),
                    "idle_passes": idle_passes,
                    "decoded": sum(sum(e.loss_mask) for e in episodes)}, out)
    dist.destroy_process_group()


def test_fsdp_two_processes_give_the_update_of_one(tiny, tmp_path):
    """--fsdp, float32 (fp32 policy): 2 processes, each with its share of the episodes and
    half of every weight, take the same two AdamW steps as one process with all the
    episodes and the whole model (precision.MasterWeights): the same logged statistics
    (relative 1e-5) and the same weights after the steps (within 1e-6; each moved by
    about 2e-3). Not bitwise: the gradients are summed in another order."""
    from transformers import AutoModelForCausalLM

    import precision

    _, path = tiny
    out = str(tmp_path / "fsdp.pt")
    mp.spawn(_fsdp_worker, args=(2, _free_port(), path, out), nprocs=2, join=True)
    two = torch.load(out)
    assert two["units"] == 3 and two["gathers"] == 3 and two["decoded"] > 6  # 2 layers and the root, once each
    assert two["idle_passes"] == [0, 2 * 2]  # mu = 2 optimizer steps
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    master = precision.MasterWeights(model, "fp32")
    eps, advs, _ = _three_groups()
    one = _adamw_update(model, master, eps, advs)
    assert one["trained_episodes"] == 7 and one["micro_batches"] == 4 and one["grad_norm"] > 0.1  # clipped
    assert two["upd"].keys() == one.keys()
    for k, v in one.items():
        assert two["upd"][k] == (v if v is None or isinstance(v, int) else pytest.approx(v, rel=1e-5, abs=1e-9)), k
    mine = master.state_dict()
    assert two["state"].keys() == mine.keys()
    for k, w in mine.items():
        assert (w - init[k]).abs().max() > 1e-3, k  # every weight moved
        torch.testing.assert_close(two["state"][k], w, atol=1e-6, rtol=0, msg=k)


LAUNCHER = """import sys
sys.path.insert(0, {here!r})
import train
from conftest import task_for
sys.exit(train.main(task=task_for(sys.argv[1:])))  # TEST_RUBRIC: rewards that a random tiny model earns, so it really trains
"""


def _torchrun_fsdp(launcher, tiny_path, out, steps, extra=()):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(launcher), "--model", tiny_path, "--steps", str(steps), "--questions-per-step", "2", "--group-size", "2",
           "--max-turn-tokens", "8", "--eval-every", "2", "--eval-questions", "2", "--probe-questions", "2",
           "--device", "cpu", "--save-every", "1", "--lr", "1e-3", "--precision", "bf16", "--fsdp",
           "--output-dir", str(out), *extra]
    p = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]


def test_fsdp_resume_continues_exactly_and_saves_a_plain_checkpoint(tiny, tmp_path):
    """torchrun --fsdp (bf16 policy, gloo): a 2-step run, and a 1-step run resumed to 2
    steps, log the same lines (times, and the 1-step run's evaluation of its last step,
    excepted) and save the same weights; the checkpoint
    is a folder that plain transformers loads (float32), with the optimizer's shards in
    DCP; resuming it with another number of processes is refused in one line."""
    from transformers import AutoModelForCausalLM

    import train

    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER.format(here=HERE))
    _torchrun_fsdp(launcher, tiny[1], tmp_path / "full", 2)
    _torchrun_fsdp(launcher, tiny[1], tmp_path / "cut", 1)
    _torchrun_fsdp(launcher, tiny[1], tmp_path / "cut", 2, ["--resume"])

    def lines(run):
        return [{k: v for k, v in json.loads(line).items() if not k.startswith("time_")} for line in open(run / "log.jsonl")]

    full, cut = lines(tmp_path / "full"), lines(tmp_path / "cut")
    assert [r["step"] for r in full] == [0, 1, 2] and all(r["trained_episodes"] > 0 for r in full[1:])
    assert full[2]["eval_episodes"] == 2 and "probe_kl_mean" in full[2]
    assert "eval_exact_match" in cut[1]  # the 1-step run evaluated its last step, as every run does
    cut[1] = {k: v for k, v in cut[1].items() if not k.startswith("eval_")}
    assert cut == full
    ckpt = tmp_path / "cut" / "checkpoint"
    assert (ckpt / "optimizer" / ".metadata").exists() and "optimizer" not in torch.load(ckpt / "trainer_state.pt",
                                                                                         weights_only=False)
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "full" / "checkpoint")
    b = AutoModelForCausalLM.from_pretrained(ckpt)
    assert b.dtype == torch.float32 and b.get_input_embeddings().weight is b.get_output_embeddings().weight
    start = AutoModelForCausalLM.from_pretrained(tiny[1]).state_dict()
    for k, w in b.state_dict().items():
        assert torch.equal(w, a.state_dict()[k]), k
    assert any(not torch.equal(w, start[k]) for k, w in b.state_dict().items())  # it trained
    args = ["--model", tiny[1], "--steps", "3", "--questions-per-step", "2", "--group-size", "2", "--max-turn-tokens", "8",
            "--eval-every", "2", "--eval-questions", "2", "--probe-questions", "2", "--device", "cpu", "--save-every", "1",
            "--lr", "1e-3", "--precision", "bf16", "--fsdp", "--output-dir", str(tmp_path / "cut"), "--resume"]
    with pytest.raises(SystemExit, match=r"^error: the checkpoint was saved by 2 processes; resume it with as many$"):
        train.main(args)  # one process
