"""Final-eval bench on the demo: sliding window, normalized mixer, reference Hedge and ablations, one run.

    python3 data/prepare_demo.py
    torchrun --standalone --nproc_per_node=2 bench/eval_mixers.py    # or python3 bench/eval_mixers.py (1 rank)

Trains the PRESET=demo model exactly as train_gpt.main does (Trainer, SWA) unless BENCH_WEIGHTS (default
/tmp/eval_demo_weights.pt) already holds its state_dict, then saves it there for reuse: train_gpt.py does not write
an artifact yet. Every row then evaluates those float weights at full depth on the demo's capped validation split.
The three headline rows go through train_gpt.run_final_evals (its log lines land in logs/<RUN_ID>.txt); the
ablation rows run train_gpt.eval_windows with a Mixer changed piece by piece. Prints one line per row from rank 0:
val_bpb, its difference from the sliding window, eval time of the whole pass (forwards + mixer) and of the mixer
alone, their ratio within the pass (the overhead of mixing, robust to a shared CPU), the ratio to the MIXER=off run,
and the largest |sum over the vocabulary - 1| of the mixture at the spot-checked positions.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import sentencepiece
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_gpt  # noqa: E402
from train_gpt import Mixer  # noqa: E402


def demo_weights(cfg, rt, tables, val_tokens, path: Path) -> train_gpt.GPT:
    """The demo model after training + SWA, from `path` when it exists, else trained now and saved there."""
    model = train_gpt.build_model(cfg, rt)
    if path.exists():
        model.load_state_dict(torch.load(path, map_location=rt.device))
        return model
    batches = train_gpt.TrainBatches(train_gpt.TokenStream(train_gpt.shard_paths(cfg.data_path, "train")), rt.rank,
                                     rt.world_size, train_gpt.local_batch_tokens(cfg, rt.world_size),
                                     cfg.train_seq_len, rt.device)
    trainer = train_gpt.Trainer(cfg, rt, model, rt.compile(model),
                                train_gpt.build_optimizers(model, cfg, fused=rt.is_cuda), batches, val_tokens, tables)
    trainer.prime_compiled_graphs()
    state = trainer.run()
    train_gpt.swa_apply(state, model)
    if rt.is_main:
        torch.save(model.state_dict(), path)
    rt.barrier()
    return model


def drop(mixer: Mixer, expert: int) -> Mixer:
    """Take an expert out of the mixture: a log-weight of -inf stays -inf under both updates."""
    mixer.log_weights[:, expert] = -math.inf
    return mixer


def global_weights(mixer: Mixer) -> Mixer:
    """One weight vector for every position (no context gate)."""
    mixer.log_weights = mixer.log_weights[:1].clone()
    return mixer


def per_token(mixer: Mixer) -> Mixer:
    mixer.per_token = True
    return mixer


ABLATIONS = {  # label -> (MIXER, how the Mixer is changed); each row adds one piece to the one above
    "reference 4 proper experts (no entropy), per-batch tables, global Hedge":
        ("reference_hedge", lambda m: drop(m, 4)),
    "  + per-token tables": ("reference_hedge", lambda m: per_token(drop(m, 4))),
    "  EG on the mixture loss instead of Hedge, no cold start": ("normalized", lambda m: global_weights(drop(m, 4))),
    "  + interpolated trigram expert (global weights)": ("normalized", global_weights),
    "  + context gate = MIXER=normalized": ("normalized", lambda m: m),
    "normalized without the spec add-alpha experts (neural + interpolated)":
        ("normalized", lambda m: drop(drop(drop(m, 1), 2), 3)),
}


def timed_eval(cfg, rt, model, val_tokens, tables, mixer) -> dict:
    """One sliding + mixer pass through eval_windows: val_bpb, total and mixer-only ms (max over ranks), mass error."""
    plan = train_gpt.window_plan(len(val_tokens) - 1, cfg.eval_seq_len, cfg.eval_stride)
    rt.barrier()
    start = time.perf_counter()
    results, mixer_ms = train_gpt.eval_windows(rt, model, val_tokens, tables, cfg.num_repeats, plan,
                                               cfg.eval_batch_seqs, mixer)
    total_ms = 1000 * (time.perf_counter() - start)
    return dict(bpb=results["mixed"][1], total_ms=rt.all_max(total_ms)[0], mixer_ms=rt.all_max(mixer_ms)[0],
                mass_err=rt.all_max(mixer.errors[0])[0])


def headline(cfg, rt, model, val_tokens, tables) -> dict[str, dict]:
    """MIXER=off, normalized, reference_hedge through run_final_evals; numbers from its JSON records (rank 0)."""
    rows = {}
    for mixer in ("off", "normalized", "reference_hedge"):
        train_gpt.run_final_evals(dataclasses.replace(cfg, mixer=mixer), rt, model, val_tokens, tables)
        if not rt.is_main:
            continue
        records = [json.loads(line) for line in rt.log_path.with_suffix(".jsonl").read_text().splitlines()]
        sliding, final = records[-2:] if mixer != "off" else records[-1:] * 2
        rows[f"MIXER={mixer}" + (" (sliding window only)" if mixer == "off" else "")] = dict(
            bpb=final["val_bpb"], total_ms=final["eval_time_ms"],
            mixer_ms=final["eval_time_ms"] - sliding["eval_time_ms"],
            mass_err=final.get("mixer_mass_max_abs_err", float("nan")))
    return rows


def main() -> None:
    env = {"PRESET": "demo", "RUN_ID": "bench_eval", **os.environ}
    cfg = train_gpt.Config.from_env({k: v for k, v in env.items() if not k.startswith("BENCH_")})
    rt = train_gpt.Runtime(cfg, env)
    cfg = rt.cfg
    sp = sentencepiece.SentencePieceProcessor(model_file=cfg.tokenizer_path)
    tables = train_gpt.build_byte_tables(sp, cfg.vocab_size).to(rt.device)
    val_tokens = train_gpt.load_val_tokens(cfg)
    model = demo_weights(cfg, rt, tables, val_tokens, Path(env.get("BENCH_WEIGHTS", "/tmp/eval_demo_weights.pt")))
    model.eval()
    rt.log(f"bench:eval world_size:{rt.world_size} threads:{torch.get_num_threads()} val_targets:{len(val_tokens) - 1}"
           f" window:{cfg.eval_seq_len} stride:{cfg.eval_stride} batch_seqs:{cfg.eval_batch_seqs}")
    rows = headline(cfg, rt, model, val_tokens, tables)
    for label, (mode, change) in ABLATIONS.items():
        run_cfg = dataclasses.replace(cfg, mixer=mode)
        rows[label] = timed_eval(run_cfg, rt, model, val_tokens, tables, change(Mixer(run_cfg, val_tokens, rt.device)))
    for seqs in (4, 8, 32):
        run_cfg = dataclasses.replace(cfg, eval_batch_seqs=seqs)
        label = f"MIXER=normalized, EVAL_BATCH_SEQS={seqs} ({seqs * rt.world_size * cfg.eval_stride} targets/update)"
        rows[label] = timed_eval(run_cfg, rt, model, val_tokens, tables, Mixer(run_cfg, val_tokens, rt.device))
    if rt.is_main:
        base = rows["MIXER=off (sliding window only)"]
        for label, row in rows.items():
            rt.log(f"bench:row val_bpb:{row['bpb']:.5f} vs_sliding:{row['bpb'] - base['bpb']:+.5f} "
                   f"eval_ms:{row['total_ms']:.0f} mixer_ms:{row['mixer_ms']:.0f} "
                   f"ratio_in_pass:{row['total_ms'] / (row['total_ms'] - row['mixer_ms']):.3f} "
                   f"ratio_vs_off_run:{row['total_ms'] / base['total_ms']:.2f} mass_err:{row['mass_err']:.1e} "
                   f"| {label}")
    rt.shutdown(0)


if __name__ == "__main__":
    main()
