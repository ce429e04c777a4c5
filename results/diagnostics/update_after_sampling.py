"""Does sampling before an update, or the benchmark's heap trim, slow the update? (issue 23,
docs/performance.md). One process, one thread: the benchmark's update workload
(update_copies.workload: 2 training questions x G = 8, seed 2, 16 episodes), one untimed
update, then 3 rounds of each variant named on the command line, in turn:
  w   the update alone, back to back (warm)
  s   a sampling call (the same 2 questions, G = 8), then the update
  st  sampling, bench.reset_peak_memory (gc + glibc malloc_trim), then the update
  t   the trim alone, then the update
Prints each update's seconds and minor page faults, then the medians.

    THP_MEM_ALLOC_ENABLE=0 OMP_NUM_THREADS=1 python results/diagnostics/update_after_sampling.py w,s,st,t
    THP_MEM_ALLOC_ENABLE=1 OMP_NUM_THREADS=1 python results/diagnostics/update_after_sampling.py w,st
"""
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import update_copies  # noqa: E402


def main(order):
    model, master, opt, sched, eps, advs, ucfg, tok = update_copies.workload()
    import torch

    import bench
    import data
    import sampler
    import tasks
    import train

    rows = [data.load_task("factbook", "train")[i] for i in range(2)]
    env = tasks.build({"task": "factbook", "fewshot": True, "demo": "jp"}).env
    cfg = sampler.RolloutConfig(max_turn_tokens=64, temperature=bench.T, top_k=bench.K)

    def update():
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = time.perf_counter()
        train.update(model, master, opt, sched, eps, advs, ucfg, tok.pad_token_id)
        return time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0

    update()  # warm-up
    res = {k: [] for k in order}
    for rep in range(3):
        for k in order:
            if "s" in k:
                sampler.sample_episodes(model, tok, rows, env, 8, cfg, generator=torch.Generator().manual_seed(5))
            if "t" in k:
                bench.reset_peak_memory("cpu")
            res[k].append(update())
            print(k, rep, "%.2f s  %d faults" % res[k][-1], flush=True)
    for k in order:
        print(k, "median %.2f s" % statistics.median(t for t, _ in res[k]), "faults", statistics.median(f for _, f in res[k]))


if __name__ == "__main__":
    main(sys.argv[1].split(","))
