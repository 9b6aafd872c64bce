"""Speed of the Any2Any model: forward, forward+backward (one training step) and sampling.

    python benchmarks/model_speed.py [--config configs/pretrain_cpu.yaml ...] [--device cpu]

Every config is compared with the tiny CI config (configs/pretrain_tiny.yaml), measured in
the same run. Per config it prints the parameter count, the time of ``to_model`` for one
case, of one forward pass (batch 1, no grad), of one training step (batch of the config's
``train.batch_size``: forward, backward, AdamW step) and of sampling one case (DDIM,
``--sampling-steps`` steps), each the fastest of ``--repeats`` runs after one warm-up (the
least disturbed by other processes on a shared machine), and training steps per hour.
Inputs come from the real OpenKBP patient pt_108 (../shared/data) when it is there, else
from random tensors of the right shapes.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from data_paths import PT_108

from dosegym.diffusion.config import PretrainConfig
from dosegym.diffusion.model import Any2Any
from dosegym.diffusion.sample import sample
from dosegym.diffusion.schedulers import make_scheduler
from dosegym.diffusion.slots import SLOT_CHANNELS, ModelInput, collate, to_model

REPO = Path(__file__).resolve().parents[1]
CASE = PT_108


def timed(fn: Callable[[], object], repeats: int, device: torch.device) -> tuple[float, float]:
    """Fewest wall seconds and fewest process CPU seconds of ``fn`` over ``repeats`` runs,
    after one warm-up."""
    fn()
    walls, cpus = [], []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return min(walls), min(cpus)


def inputs(cfg: PretrainConfig, device: torch.device, case_path: Path) -> tuple[ModelInput, float]:
    spec = cfg.model.spec
    if case_path.exists():
        from dosegym.data import read_case

        case = read_case(case_path)
        t0 = time.perf_counter()
        mi, _ = to_model(case, spec)
        return collate([mi]).to(device), time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)
    tensors = {s: torch.rand((SLOT_CHANNELS[s], *spec.shape), generator=g) for s in spec.slots}
    roles = {s: "generate" if s == spec.generate else "condition" for s in spec.slots}
    return collate([ModelInput(tensors, roles, torch.tensor(70.0))]).to(device), float("nan")


def measure(
    cfg: PretrainConfig,
    device: torch.device,
    repeats: int,
    sampling_steps: int,
    case_path: Path = CASE,
    bf16: bool = False,
) -> dict[str, float]:
    """Time one config (see module docstring); ``bf16`` runs every pass under bf16 autocast."""
    torch.manual_seed(0)
    model = Any2Any(cfg.model).to(device)
    cond, t_prep = inputs(cfg, device, case_path)
    gen = cond.generate_slot
    x1 = torch.randn(1, SLOT_CHANNELS[gen], *cfg.model.spec.shape, device=device)
    b = cfg.train.batch_size
    batch = cond.expand(b)
    xb = x1.expand(b, -1, -1, -1, -1).contiguous()
    sched = make_scheduler("ddpm", cfg.model.diffusion)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def forward() -> None:
        with torch.no_grad():
            model(x1, torch.tensor([500], device=device), cond)

    def train_step() -> None:
        t = torch.randint(0, 1000, (b,), device=device)
        noise = torch.randn_like(xb)
        x_t = sched.add_noise(xb, noise, t)
        loss = F.mse_loss(model(x_t, t, batch), sched.get_velocity(xb, noise, t))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sampling() -> None:
        sample(model, cond, "ddim", sampling_steps, torch.Generator().manual_seed(0), eta=1.0)

    def run(fn: Callable[[], object]) -> Callable[[], object]:
        def wrapped() -> object:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                return fn()

        return wrapped

    model.eval()
    t_fwd, _ = timed(run(forward), repeats, device)
    model.train()
    t_step, c_step = timed(run(train_step), repeats, device)
    model.eval()
    t_sample, _ = timed(run(sampling), max(1, repeats // 2), device)
    return {
        "params": float(model.num_parameters()),
        "to_model_s": t_prep,
        "forward_s": t_fwd,
        "train_step_s": t_step,
        "train_step_cpu_s": c_step,
        "steps_per_hour": 3600.0 / t_step,
        "sample_s": t_sample,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--config",
        action="append",
        type=Path,
        help="config(s) to measure (default configs/pretrain_cpu.yaml)",
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sampling-steps", type=int, default=20)
    ap.add_argument("--case", type=Path, default=CASE, help="case to take inputs from (default pt_108)")
    ap.add_argument("--bf16", action="store_true", help="run under bf16 autocast (GPU)")
    args = ap.parse_args()
    device = torch.device(args.device)
    configs = [
        REPO / "configs" / "pretrain_tiny.yaml",
        *(args.config or [REPO / "configs" / "pretrain_cpu.yaml"]),
    ]
    print(
        f"device {device}, torch threads {torch.get_num_threads()}, torch {torch.__version__}, "
        f"inputs from {'pt_108' if CASE.is_dir() else 'random tensors'}"
    )
    rows = []
    for path in configs:
        cfg = PretrainConfig.from_yaml(path)
        res = measure(cfg, device, args.repeats, args.sampling_steps, args.case, args.bf16)
        rows.append((path.name, cfg, res))
    base = rows[0][2]
    head = (
        f"{'config':<24}{'grid':>12}{'params':>10}{'to_model':>10}{'forward':>10}"
        f"{'train step':>12}{'(cpu s)':>9}{'steps/h':>9}{'sample':>9}{'x fwd':>8}{'x step':>8}{'x sample':>9}"
    )
    print(head)
    for name, cfg, r in rows:
        grid = "x".join(str(n) for n in cfg.model.spec.shape)
        print(
            f"{name:<24}{grid:>12}{r['params'] / 1e6:>9.2f}M{r['to_model_s']:>9.2f}s{r['forward_s']:>9.3f}s"
            f"{r['train_step_s']:>11.3f}s{r['train_step_cpu_s']:>8.2f}s{r['steps_per_hour']:>9.0f}{r['sample_s']:>8.2f}s"
            f"{r['forward_s'] / base['forward_s']:>8.1f}{r['train_step_s'] / base['train_step_s']:>8.1f}"
            f"{r['sample_s'] / base['sample_s']:>9.1f}"
        )
    print(
        f"train step = batch of train.batch_size (forward, backward, AdamW); cpu s = its process CPU "
        f"time (all threads); sample = one case, DDIM {args.sampling_steps} steps; 'x' columns: ratio "
        f"to {rows[0][0]} measured in this run; times are the fastest of the repeats"
    )


if __name__ == "__main__":
    main()
