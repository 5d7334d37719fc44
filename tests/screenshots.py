"""Full-page Chromium screenshots of EvalHub's main pages on realistic demo data.

    .venv/bin/python -m tests.screenshots --out /tmp/screens     (or: make screenshots)

It builds a throwaway install as `make run` does in a fresh directory (SQLite and the SQL-file
broker under a temporary EVALHUB_VAR_DIR; `migrate`, `bootstrap` with its demo campaigns, demo
job and the bundled SmolLM2), then adds what a team's first weeks leave behind: people in each
role, two models derived from SmolLM2, evaluation runs (finished, partial, one still running, one
failed), raters' labels on every campaign, a multi-turn campaign, an export and prompt sets. The
runs go through the real evaluation job on the real suite data; only the model's answers come
from a stand-in backend (a 135M model on CPU would take many minutes), so the scores are
made up. The pages are served on a local port by Django's threaded WSGI server and shot 1280
px wide, the rater's task page also 390 px wide. Nothing is written to the repository.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
from datetime import timedelta
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "screenshots-password-1"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "evalhub-screens")
    parser.add_argument("--var", type=Path, help="the install's directory (default: a new temp)")
    args = parser.parse_args()
    var = args.var or Path(tempfile.mkdtemp(prefix="evalhub-screens-"))
    fresh = not (var / "db.sqlite3").exists()
    for name in ("DATABASE_URL", "CELERY_BROKER_URL", "DJANGO_ALLOW_ASYNC_UNSAFE"):
        os.environ.pop(name, None)
    os.environ.update(
        EVALHUB_VAR_DIR=str(var),
        EVALHUB_HTTPS="false",
        EVALHUB_MANIFEST_STATIC="false",
        DJANGO_SETTINGS_MODULE="evalhub.settings",
    )
    if fresh:
        manage = [sys.executable, str(ROOT / "manage.py")]
        subprocess.run(manage + ["migrate", "--noinput"], cwd=ROOT, check=True, capture_output=True)
        subprocess.run(manage + ["bootstrap"], cwd=ROOT, check=True, capture_output=True)
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()
    if fresh:
        fill()
    # Playwright's sync API runs an event loop in this thread; the ORM refuses that otherwise.
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    base = serve()
    args.out.mkdir(parents=True, exist_ok=True)
    shoot(base, args.out)
    print(f"install: {var}\nscreenshots: {args.out}")


# ----------------------------------------------------------------------------- demo data
class StandIn:
    """Answers in place of a model: seeded by the prompt and the model's name, right with
    probability ``skill`` where the suite's reference is known (GSM8K), otherwise plausible."""

    def __init__(self, name: str, skill: float, answers: dict[str, str]):
        self.name, self.skill, self.answers = name, skill, answers

    def _rng(self, text: str) -> random.Random:
        return random.Random(hashlib.sha256(f"{self.name}\n{text}".encode()).digest())

    def generate(self, prompts, args, **kwargs):
        return [self._answer(p) for p in prompts]

    def _answer(self, prompt: str) -> str:
        rng = self._rng(prompt)
        question = prompt.rsplit("Q: ", 1)[-1].split("\nA:")[0].strip()
        if question in self.answers:
            target = self.answers[question]
            right = rng.random() < self.skill
            wrong = int(float(target.replace(",", ""))) + rng.choice([-3, -1, 2, 10])
            value = target if right else str(wrong)
            return f" Let's work it out step by step. The total is {value}. The answer is {value}."
        if rng.random() < 0.3:
            return "I'm sorry, but I can't help with that request."
        return (
            "Here is a short answer.\n\nFirst, consider the main point: the request asks for a "
            "clear, direct response. Second, the details matter, so each step is explained. "
            "In summary, the answer follows from the points above."
        )

    def loglikelihood(self, pairs):
        out = []
        for context, continuation in pairs:
            rng = self._rng(context + continuation)
            out.append((-rng.uniform(0.5, 3.0) + (self.skill if rng.random() < 0.4 else 0), False))
        return out

    def chat_format(self, messages):
        return "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages) + "<|assistant|>\n"

    def info(self):
        return {"backend": "stand-in for screenshots", "skill": self.skill}


def fill() -> None:
    from django.contrib.auth import get_user_model
    from django.contrib.auth.models import Group
    from django.utils import timezone

    from core.models import Job
    from evalhub.models import ModelVersion
    from grading.models import Campaign

    User = get_user_model()

    def person(username, *roles, **fields):
        user, _ = User.objects.get_or_create(username=username, defaults=fields)
        user.set_password(PASSWORD)
        user.save()
        user.groups.add(*(Group.objects.get(name=r) for r in roles))
        return user

    admin = person("admin", "admin")
    carol = person("carol", "researcher", first_name="Carol", email="carol@example.org")
    person("dana", "researcher", email="dana@example.org")
    raters = [person(n, "rater", email=f"{n}@example.org") for n in ("alice", "bob", "erin")]
    person("frank", "rater").__class__.objects.filter(username="frank").update(is_active=False)

    base = ModelVersion.objects.get(name="smollm2-135m-instruct")
    train, trained = posttrain_job(carol, base)
    sft = ModelVersion.objects.create(
        name="smollm2-135m-sft-helpful",
        backend="builtin",
        location=base.location + "-sft",
        n_params=base.n_params,
        size_bytes=base.size_bytes,
        relation=ModelVersion.TRAINED,
        parent=base,
        created_by=carol,
        description=f"SFT of {base.name} (job {train.pk})",
        info={"config": base.info.get("config"), "posttrain": trained},
    )
    train.result = {"model_id": sft.pk, "name": sft.name, "steps": 206, "eval_runs": []}
    train.save(update_fields=["result"])
    pal = ModelVersion.objects.create(
        name="smollm2-135m-sft-helpful-pal4",
        backend="builtin",
        location=base.location + "-pal4",
        n_params=base.n_params,
        size_bytes=(base.size_bytes or 270_000_000) // 4,
        bits_per_weight=4.0,
        relation=ModelVersion.COMPRESSED,
        parent=sft,
        created_by=carol,
        description="4-bit palettized (k-means LUT per group of 32)",
    )
    skills = {base.name: 0.25, sft.name: 0.4, pal.name: 0.36}
    runs(carol, skills)
    grading(carol, raters)
    jobs(carol)
    prompt_sets(carol)
    Job.objects.filter(status=Job.QUEUED, kind="demo").update(created_at=timezone.now())
    assert Campaign.objects.count() >= 3 and admin


def posttrain_job(user, base):
    """A finished SFT job with its loss curve, as evalhub.posttrain leaves one."""
    from django.utils import timezone

    from core.models import Job

    rng = random.Random(3)
    steps = list(range(0, 207, 4))
    loss = [round(2.9 * 0.55 ** (s / 80) + 0.9 + rng.uniform(-0.08, 0.08), 4) for s in steps]
    now = timezone.now()
    job = Job.objects.create(
        kind="posttrain.sft",
        status=Job.SUCCEEDED,
        progress=1.0,
        message="step 206/206 loss 1.1020",
        queue="models",
        attempts=1,
        created_by=user,
        created_at=now - timedelta(hours=5),
        started_at=now - timedelta(hours=5),
        finished_at=now - timedelta(hours=4, minutes=12),
        data={
            "curves": {"loss": {"step": steps, "value": loss}},
            "loss_curve": {"step": steps, "loss": loss},
        },
    )
    hp = {"epochs": 2, "batch_size": 4, "max_len": 1024, "lora_rank": 0, "lr": 2e-05}
    job.params = {"model_id": base.pk, "campaign_ids": [1], "name": "smollm2-135m-sft-helpful"}
    job.params.update(epochs=2, batch_size=4)
    job.save(update_fields=["params"])
    info = {
        "algorithm": "sft",
        "trained_by": "sft",
        "hyperparameters": hp,
        "data": {"campaign_ids": [1], "labels_hash": hashlib.sha256(b"l").hexdigest()},
        "data_hash": hashlib.sha256(b"d").hexdigest(),
        "n_examples": 412,
        "steps": 206,
        "job_id": job.pk,
    }
    return job, info


def runs(user, skills: dict[str, float]) -> None:
    from django.utils import timezone

    from core.jobs import KINDS, execute
    from core.models import Job
    from evalhub.models import EvalRun, EvalSample, ModelVersion
    from suites.gsm8k import GSM8K

    answers = {ex.question.strip(): ex.target for ex in GSM8K().examples()}
    plan = [("gsm8k", 200), ("ifeval", None), ("mmlu", 300)]
    for model in ModelVersion.objects.filter(name__in=skills):
        for suite, limit in plan:
            settings = {"seed": 1, "batch_size": 16, **({"limit": limit} if limit else {})}
            run = EvalRun.objects.create(model=model, suite=suite, settings=settings)
            run.job = Job.objects.create(
                kind="evaluate", params={"run_id": run.pk}, created_by=user
            )
            run.save(update_fields=["job"])
            backend = StandIn(model.name, skills[model.name], answers)
            with mock.patch("evalhub.evaluation.backend_for", return_value=backend):
                execute(run.job.pk, KINDS["evaluate"].job_fn)
    # One run still going: a third of its samples in, its worker beating.
    done = EvalRun.objects.filter(suite="gsm8k", model__name="smollm2-135m-sft-helpful").first()
    model = ModelVersion.objects.get(name="smollm2-135m-sft-helpful-pal4")
    now = timezone.now()
    job = Job.objects.create(
        kind="evaluate",
        status=Job.RUNNING,
        progress=0.3,
        message="batch 5 of 17: 1,840 tokens generated",
        started_at=now - timedelta(minutes=3),
        heartbeat_at=now,
        attempts=1,
        queue="models",
        created_by=user,
    )
    live = EvalRun.objects.create(
        model=model,
        suite="gsm8k",
        settings={"limit": 250, "seed": 2, "batch_size": 16},
        planned=250,
        suite_size=1319,
        job=job,
    )
    job.params = {"run_id": live.pk}
    job.save(update_fields=["params"])
    EvalSample.objects.bulk_create(
        [
            EvalSample(
                run=live,
                example_id=s.example_id,
                metrics=s.metrics,
                extracted=s.extracted,
                details=s.details,
                passed=s.passed,
                category=s.category,
            )
            for s in done.samples.all()[:64]
        ]
    )
    # One that failed: its run was deleted before a worker got to it.
    gone = EvalRun.objects.create(model=model, suite="mmlu", settings={"limit": 50})
    failed = Job.objects.create(kind="evaluate", params={"run_id": gone.pk}, created_by=user)
    gone.delete()
    execute(failed.pk, KINDS["evaluate"].job_fn)


BASE, SFT = "smollm2-135m-instruct", "smollm2-135m-sft-helpful"
CHATS = [
    (
        [
            {"role": "system", "content": "You are a support assistant for a Git hosting service."},
            {"role": "user", "content": "My push is rejected with `non-fast-forward`. Why?"},
            {
                "role": "assistant",
                "content": "The remote branch has commits your local branch lacks. Fetch them "
                "first: `git pull --rebase`, then push again.",
            },
            {"role": "user", "content": "I did that and now there are conflicts in `app.py`."},
        ],
        "Open `app.py`, find the blocks between `<<<<<<<` and `>>>>>>>`, keep the lines you want "
        "and delete the markers. Then:\n\n```\ngit add app.py\ngit rebase --continue\n"
        "git push\n```\n\nIf it gets confusing, `git rebase --abort` puts you back where you were.",
        "Just run `git push --force`. That will overwrite the remote with your version and the "
        "conflicts go away.",
    ),
    (
        [
            {"role": "user", "content": "Give me a 3-day itinerary for Lisbon on a budget."},
            {
                "role": "assistant",
                "content": "Day 1: Alfama and the castle; Day 2: Belém; Day 3: Sintra by train.",
            },
            {"role": "user", "content": "We can't do stairs well. Adjust it?"},
        ],
        "Of course. Alfama is steep, so take tram 28 up to the castle and walk down slowly, or "
        "skip it for the flat riverside from Cais do Sodré to Belém. In Sintra, the 434 bus goes "
        "to Pena Palace's gate, avoiding the climb.",
        "Lisbon is known as the city of seven hills. Day 1: Alfama. Day 2: Belém. Day 3: Sintra.",
    ),
]


def grading(user, raters) -> None:
    from core.jobs import KINDS, execute, job_submit
    from grading.models import SIDE_BY_SIDE, Campaign, Label
    from grading.services import (
        assignment_claim,
        assignment_skip,
        assignment_submit,
        campaign_import,
    )
    from models.preferences import STRENGTHS

    chats = Campaign.objects.create(
        name="Support chats, second turn (side by side)",
        kind=SIDE_BY_SIDE,
        guidelines="Judge only the **last** answer, in the light of the whole conversation. "
        "Prefer the answer that solves the user's problem safely.",
        gold_rate=0.0,
        overlap=2,
        created_by=user,
    )
    rows = [
        {"messages": m, "response_a": a, "response_b": b, "model_a": SFT, "model_b": BASE}
        for m, a, b in CHATS * 6
    ]
    data = "\n".join(json.dumps(r) for r in rows).encode()
    campaign_import(campaign=chats, data=data, filename="support-chats.jsonl")
    rng = random.Random(7)
    levels = [f"{side}_{level}" for side in ("left", "right") for level in STRENGTHS]
    levels += ["left_better", "left_better", "tie_both_good", "tie_both_bad"]
    for campaign in Campaign.objects.all():
        for rater in raters:
            for i in range(5 if campaign == chats else 14):
                a = assignment_claim(rater=rater, campaign=campaign, rng=rng)
                if a is None:
                    break
                if i == 3:
                    assignment_skip(assignment=a, reason="I don't know this topic well enough")
                    continue
                if campaign.kind == SIDE_BY_SIDE:
                    data = {"choice": rng.choice(levels)}
                else:
                    scores = {k: rng.choice([2, 3, 4, 4, 5]) for k in campaign.aspect_keys}
                    data = {"scores": scores, "unsafe": i == 5, "comment": ""}
                    if i == 2:
                        data["comment"] = "Correct but padded; the second paragraph repeats."
                assignment_submit(assignment=a, data=data)
    # Submitted instantly here; raters take a minute or two a task.
    for label in Label.objects.all():
        label.seconds = rng.lognormvariate(4.0, 0.6)
        label.save(update_fields=["seconds"])
    export = job_submit(
        kind="grading.export",
        params={"campaign_id": Campaign.objects.order_by("pk").first().pk, "format": "jsonl"},
        user=user,
    )
    execute(export.pk, KINDS["grading.export"].job_fn)


def jobs(user) -> None:
    from core.jobs import KINDS, execute, job_submit
    from core.models import Job

    demo = Job.objects.filter(kind="demo").order_by("pk").first()
    demo.params = {"steps": 12, "delay": 0.0}
    demo.save(update_fields=["params"])
    execute(demo.pk, KINDS["demo"].job_fn)
    job_submit(kind="demo", params={"steps": 30, "delay": 0.5}, user=user)  # stays queued


def prompt_sets(user) -> None:
    from evalhub.promptsets import prompt_set_builtin, prompt_set_import

    prompt_set_builtin("arena-hard")
    questions = [
        ("refund-1", "How do I get a refund for a duplicate charge?", "billing"),
        ("refund-2", "Can I cancel an annual plan after 3 months?", "billing"),
        ("login-1", "I never receive the two-factor SMS. What now?", "account"),
        ("api-1", "What is the rate limit of the public API?", "developer"),
    ]
    rows = [{"id": i, "prompt": p, "category": c} for i, p, c in questions]
    data = "\n".join(json.dumps(r) for r in rows).encode()
    prompt_set_import(
        name="support-faq",
        data=data,
        filename="support-faq.jsonl",
        user=user,
        description="Customer questions from the support queue, anonymised",
    )


# ----------------------------------------------------------------------------- serving
def serve() -> str:
    from django.core.handlers.wsgi import WSGIHandler
    from django.core.servers.basehttp import ThreadedWSGIServer, WSGIRequestHandler

    class Quiet(WSGIRequestHandler):
        def log_message(self, *args):
            pass

    server = ThreadedWSGIServer(("127.0.0.1", 0), Quiet, allow_reuse_address=False)
    server.set_app(WSGIHandler())
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}"


# ----------------------------------------------------------------------------- shooting
def pages() -> list[tuple[str, str, str]]:
    """(file name, user, path) for each page shot."""
    from django.urls import reverse

    from core.models import Job
    from evalhub.models import EvalRun, ModelVersion, PromptSet
    from grading.models import Campaign

    first = Campaign.objects.order_by("pk")
    side, single = first[0], first[1]
    export = Job.objects.filter(kind="grading.export").first()
    posttrain = Job.objects.filter(kind="posttrain.sft").first()
    finished = EvalRun.objects.filter(suite="gsm8k", complete=False, job__status="succeeded")
    live = EvalRun.objects.filter(job__status="running").first()
    failed = Job.objects.filter(status="failed").first()
    derived = ModelVersion.objects.filter(relation="trained_from").first()
    promptset = PromptSet.objects.filter(name="support-faq").first()
    return [
        ("01-home", "carol", reverse("home")),
        ("02-jobs", "carol", reverse("job_list")),
        ("03-job-export", "carol", reverse("job_detail", args=[export.pk])),
        ("03b-job-posttrain", "carol", reverse("job_detail", args=[posttrain.pk])),
        ("04-job-failed", "carol", reverse("job_detail", args=[failed.pk])),
        ("05-models", "carol", reverse("model_list")),
        ("06-model", "carol", reverse("model_detail", args=[derived.pk])),
        ("07-leaderboard", "carol", reverse("leaderboard")),
        ("08-leaderboard-partial", "carol", reverse("leaderboard") + "?partial=1"),
        ("09-runs", "carol", reverse("run_list")),
        ("10-run-finished", "carol", reverse("run_detail", args=[finished.first().pk])),
        ("11-run-live", "carol", reverse("run_detail", args=[live.pk])),
        ("12-campaigns", "carol", reverse("grading:campaigns")),
        ("13-campaign", "carol", reverse("grading:campaign", args=[side.pk])),
        ("14-campaign-single", "carol", reverse("grading:campaign", args=[single.pk])),
        ("15-labels", "carol", reverse("grading:labels", args=[side.pk])),
        ("16-labels-single", "carol", reverse("grading:labels", args=[single.pk])),
        ("17-new-campaign", "carol", reverse("grading:campaigns") + "#new-campaign"),
        ("18-prompt-sets", "carol", reverse("prompt_set_list")),
        ("19-prompt-set", "carol", reverse("prompt_set_detail", args=[promptset.pk])),
        ("20-people", "admin", reverse("people")),
        ("21-judges", "carol", reverse("campaign_judges", args=[side.pk])),
        ("22-rater-home", "alice", reverse("grading:home")),
    ]


def shoot(base: str, out: Path) -> None:
    from django.contrib.auth import get_user_model
    from playwright.sync_api import sync_playwright

    from grading.models import Campaign
    from grading.services import assignment_claim

    campaigns = list(Campaign.objects.order_by("pk"))
    chats = next(c for c in campaigns if c.name.startswith("Support chats"))
    single = campaigns[1]
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu"]
        )
        contexts = {}

        def page_for(user: str, width: int = 1280):
            key = (user, width)
            if key not in contexts:
                ctx = browser.new_context(viewport={"width": width, "height": 900})
                page = ctx.new_page()
                page.goto(f"{base}/accounts/login/")
                page.fill("input[name=username]", user)
                page.fill("input[name=password]", PASSWORD)
                page.press("input[name=password]", "Enter")
                page.wait_for_load_state("networkidle")
                contexts[key] = page
            return contexts[key]

        for name, user, path in pages():
            page = page_for(user)
            page.goto(base + path)
            page.wait_for_load_state("networkidle")
            page.screenshot(path=out / f"{name}.png", full_page=True)
        alice = get_user_model().objects.get(username="alice")
        tasks = {c.pk: assignment_claim(rater=alice, campaign=c).pk for c in (chats, single)}
        for name, campaign, width in [
            ("23-rater-task-chat", chats, 1280),
            ("24-rater-task-single", single, 1280),
            ("25-rater-task-chat-mobile", chats, 390),
            ("26-rater-task-single-mobile", single, 390),
        ]:
            page = page_for("alice", width)
            page.goto(f"{base}/grading/task/{tasks[campaign.pk]}/")
            page.wait_for_load_state("networkidle")
            page.screenshot(path=out / f"{name}.png", full_page=True)
        browser.close()


if __name__ == "__main__":
    main()
