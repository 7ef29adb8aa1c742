"""Worker: make one rank fail and check the others end with a clear error, not a hang.

    torchrun --standalone --nproc-per-node 2 tests/dist_faults.py die|stall|watchdog TIMEOUT_S
"""

from __future__ import annotations

import os
import sys
import time

import torch
import torch.distributed as dist

import parallel
from parallel.faults import Watchdog, guard


def main(mode: str, timeout_s: float) -> None:
    mesh = parallel.make_mesh("dp=2", timeout_s=timeout_s)
    rank = mesh.rank
    x = torch.ones(4)
    # Only rank 0's watchdog is short in watchdog mode: were both ranks' equally short, the one that
    # fired first could be reported by torchrun (which then ends the other) before rank 0 spoke.
    short = mode == "watchdog" and rank == 0
    with guard("the fault test"), Watchdog(timeout_s if short else timeout_s * 3) as dog:
        dist.all_reduce(x)  # everyone is alive here
        print(f"rank {rank} passed the first collective", flush=True)
        if rank == 1:
            if mode == "die":
                os._exit(3)
            if mode in ("stall", "watchdog"):
                time.sleep(600)  # stuck without dying
        if mode == "watchdog" and rank == 0:
            time.sleep(600)  # rank 0 stuck in "compute": only the watchdog can notice
        dog.pet()
        dist.all_reduce(x)
        print(f"rank {rank} UNEXPECTEDLY finished", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]))
