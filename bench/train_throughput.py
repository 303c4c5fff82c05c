"""Median training throughput (tokens/s) of train_gpt's real train step on synthetic tokens.

    python3 bench/train_throughput.py                                   # 1 process
    torchrun --standalone --nproc_per_node=2 bench/train_throughput.py  # 2 gloo ranks

Shape knobs come from the usual env vars (defaults: dim 256, 3x4, seq 256, 8 sequences per rank, AUTOCAST=auto,
full depth). Prints one key:value line from rank 0 with the median over BENCH_STEPS timed steps after warm-up: the
precision used, the whole step, and its optimizer part (every optimizer's step(); the rest is forward+backward,
gradient averaging and clipping). BENCH_TORCH_MUON=1 steps the matrices with torch.optim.Muon instead (the
optimizer before train_gpt.Muon; it orthogonalises in bf16 on every device).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_gpt  # noqa: E402

BENCH_DEFAULTS = dict(MODEL_DIM="256", TRAIN_SEQ_LEN="256", GRAD_ACCUM_STEPS="1", MAX_WALLCLOCK_SECONDS="0",
                      RUN_ID="bench", VOCAB_SIZE="1024")


def main() -> None:
    steps = int(os.environ.pop("BENCH_STEPS", "20"))
    warmup = int(os.environ.pop("BENCH_WARMUP", "3"))
    rows = int(os.environ.pop("BENCH_ROWS_PER_RANK", "8"))
    torch_muon = os.environ.pop("BENCH_TORCH_MUON", "0") == "1"
    env = {**BENCH_DEFAULTS, **os.environ}
    world = int(env.get("WORLD_SIZE", 1))
    env.setdefault("TRAIN_BATCH_TOKENS", str(rows * int(env["TRAIN_SEQ_LEN"]) * world))
    cfg = train_gpt.Config.from_env(env)
    rt = train_gpt.Runtime(cfg, env)
    model = train_gpt.build_model(cfg, rt)
    batches = _RandomBatches(cfg, rt, rows)
    optimizers = train_gpt.build_optimizers(model, cfg, rt.is_cuda, rt)
    if torch_muon:
        matrices = optimizers["muon"].param_groups[0]["params"]
        optimizers["muon"] = torch.optim.Muon(matrices, lr=cfg.matrix_lr, weight_decay=cfg.muon_wd, nesterov=True,
                                              ns_steps=cfg.muon_backend_steps, adjust_lr_fn="original")
        optimizers["muon"].param_groups[0]["base_lr"] = cfg.matrix_lr
    opt_seconds = []
    for opt in optimizers.values():
        opt.step = _timed(opt.step, rt, opt_seconds)
    trainer = train_gpt.Trainer(cfg, rt, model, rt.compile(model), optimizers, batches,
                                torch.zeros(2, dtype=torch.int64), None)
    trainer.prime_compiled_graphs()
    state = train_gpt.TrainState(repeats=cfg.num_repeats)
    times, opt_times = [], []
    for i in range(warmup + steps):
        rt.barrier()
        opt_seconds.clear()
        start = time.perf_counter()
        trainer.train_step(state, 1.0, 1)
        rt.sync()
        state.step += 1
        if i >= warmup:
            times.append(time.perf_counter() - start)
            opt_times.append(sum(opt_seconds))
    median, opt_median = rt.all_max(statistics.median(times), statistics.median(opt_times))
    tokens = cfg.train_batch_tokens
    rt.log(f"bench:train world_size:{rt.world_size} threads:{torch.get_num_threads()} dim:{cfg.model_dim} "
           f"layers:{cfg.num_layers}x{cfg.num_repeats} seq:{cfg.train_seq_len} rows_per_rank:{rows} "
           f"precision:{rt.precision} muon:{'torch' if torch_muon else 'train_gpt'} "
           f"median_step_ms:{1000 * median:.1f} median_optimizer_ms:{1000 * opt_median:.1f} "
           f"optimizer_share:{opt_median / median:.0%} tokens_per_s:{tokens / median:.0f}")
    rt.shutdown(0)


def _timed(step, rt: train_gpt.Runtime, seconds: list[float]):
    """`step` that also appends its device-synchronised duration to `seconds`."""
    def timed_step(*args, **kwargs):
        rt.sync()
        start = time.perf_counter()
        out = step(*args, **kwargs)
        rt.sync()
        seconds.append(time.perf_counter() - start)
        return out
    return timed_step


class _RandomBatches:
    """Stands in for TrainBatches: uniform random tokens of the configured shape (no data files)."""

    def __init__(self, cfg: train_gpt.Config, rt: train_gpt.Runtime, rows: int):
        self.cfg, self.rt, self.rows = cfg, rt, rows
        self.local_tokens = rows * cfg.train_seq_len
        self.gen = torch.Generator().manual_seed(cfg.seed + rt.rank)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.randint(0, self.cfg.vocab_size, (self.rows, self.cfg.train_seq_len + 1), generator=self.gen)
        ids = ids.to(self.rt.device)
        return ids[:, :-1], ids[:, 1:]


if __name__ == "__main__":
    main()
