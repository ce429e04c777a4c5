"""The bf16 update with collect_grads' float32 cast in slices of rows (issue 23).

collect_grads (precision.MasterWeights) adds each backward pass's bf16 gradients into the
float32 master .grad, casting first. The tied embedding's gradient is 49152 x 576: its
whole float32 cast is a 113 MB temporary per pass, above glibc's mmap threshold, so it
comes in fresh pages that the kernel zero-fills (27k minor page faults) and is unmapped on
free. precision.add_float casts it in 8 MB slices of rows instead, which reuse heap memory.
The sum is the same bit for bit (test_train.py).

Variants, each in its own process, alternating (update_copies.py's harness: the benchmark's
16 episodes, one untimed update, 3 timed ones): `cast` (the whole cast, collect_grads at
55a945c) and `sliced` (precision.add_float, today's).

    OMP_NUM_THREADS=1 python results/diagnostics/sliced_cast.py > results/diagnostics/sliced_cast.md
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import update_copies  # noqa: E402

VARIANTS, ROUNDS = ("cast", "sliced"), 2

if __name__ == "__main__":
    if len(sys.argv) == 2:
        update_copies.child(sys.argv[1])
        sys.exit(0)
    runs = update_copies.compare(__file__, VARIANTS, ROUNDS)
    print(f"# The bf16 update, whole or sliced float32 cast: {ROUNDS} rounds x 3 timed updates per variant, one thread\n")
    print(update_copies.table(runs))
