"""Run by ``test_align_distributed.py`` under ``accelerate launch``: ``dosegym ARGS`` in each
process, printing ``rank R of W`` once the agent's optimizer has joined the process group."""

from __future__ import annotations

import sys

import torch

from dosegym.agents.optim import Optim
from dosegym.cli.main import app

_init = Optim.__init__


def _init_and_tell(self: Optim, *args, **kwargs) -> None:
    _init(self, *args, **kwargs)
    print(f"rank {self.rank} of {self.world_size}", flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    Optim.__init__ = _init_and_tell
    app(sys.argv[1:], prog_name="dosegym")
