"""Worker: a user error on one rank is printed once and ends every rank.

    torchrun --standalone --nproc-per-node 2 tests/dist_user_error.py

Rank 1 meets a bad input after the process group exists; rank 0 is waiting for it in a
collective. Rank 1 prints `prog: error: ...` and exits 2; rank 0's collective fails and
`faults.guard` ends it with its own one line.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

import parallel
from parallel import cli
from parallel.faults import guard


def main() -> None:
    mesh = parallel.make_mesh("dp=2", timeout_s=30)
    x = torch.ones(1)
    with cli.user_errors("dist_user_error.py"), guard("the user-error test"):
        dist.all_reduce(x)
        if mesh.rank == 1:
            raise cli.UserError("/data/shard1.bin: No such file (rank 1's shard)")
        dist.all_reduce(x)  # rank 0 waits here for a peer that has left
        print(f"rank {mesh.rank} UNEXPECTEDLY finished", flush=True)


if __name__ == "__main__":
    main()
