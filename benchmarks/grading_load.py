"""Load test of task assignment: simulated raters loop next-task → submit against gunicorn and
PostgreSQL on loopback, with 100k items in the campaign.

    .venv/bin/python benchmarks/grading_load.py [--raters 16] [--seconds 20] [--items 100000]

Uses its own database (evalhub_bench, dropped and re-created) on the local PostgreSQL. The
client is a lean asyncio HTTP/1.1 client (a heavy client would measure itself on 2 cores); its
own CPU share is printed. Afterwards the database is checked for lost labels (acknowledged by
the server but not stored) and duplicated ones (an item labelled twice by one rater or beyond
its overlap). It also prints the CPU the server side (gunicorn workers and their PostgreSQL
backends) spends per label, a figure that load from other programs on the machine barely moves.

What makes a label cheap (grading/services.py, grading/access.py, core/rows.py): claiming
and submitting are one SQL statement each, the token, campaign and assignment lookups are
plain queries (ORM compilation cost more than PostgreSQL's answer), PostgreSQL plans repeated
statements once per connection (prepared), and no redundant index is written per label.
Last line: labels_per_s=… p99_ms=… lost=… duplicated=…
"""

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DB_NAME = "evalhub_bench"
PG = "postgres://postgres@127.0.0.1:5432"


def prepare(args) -> tuple[int, list[str]]:
    subprocess.run(
        [
            "psql",
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-qc",
            f"DROP DATABASE IF EXISTS {DB_NAME} WITH (FORCE)",
        ],
        check=True,
    )
    subprocess.run(
        ["psql", "-h", "127.0.0.1", "-U", "postgres", "-qc", f"CREATE DATABASE {DB_NAME}"],
        check=True,
    )
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "-v0"], cwd=ROOT, check=True, env=os.environ
    )
    import django

    django.setup()
    from django.contrib.auth.models import Group, User

    from core.models import ApiToken
    from grading.models import Campaign, Item, Response

    campaign = Campaign.objects.create(
        name="load", kind="side_by_side", overlap=3, lease_seconds=600, gold_rate=0.0
    )
    t0 = time.perf_counter()
    for start in range(0, args.items, 10_000):
        n = min(10_000, args.items - start)
        items = Item.objects.bulk_create(
            [
                Item(campaign=campaign, prompt=f"Prompt {start + i}: explain something.")
                for i in range(n)
            ]
        )
        Response.objects.bulk_create(
            [
                Response(item=it, position=p, text=f"Answer {p} " * 40, model_name=f"m{p}")
                for it in items
                for p in (0, 1)
            ]
        )
    print(f"loaded {args.items} items in {time.perf_counter() - t0:.1f}s", flush=True)
    rater_group, _ = Group.objects.get_or_create(name="rater")
    tokens = []
    for i in range(args.raters):
        user = User.objects.create(username=f"loadrater{i}")
        user.groups.add(rater_group)
        tokens.append(ApiToken.issue(user=user, name="load")[1])
    return campaign.pk, tokens


async def request(port: int, path: str, token: str, body: dict) -> tuple[int, dict]:
    payload = json.dumps(body).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
        f"Connection: close\r\n\r\n".encode()
        + payload
    )
    raw = await reader.read()
    writer.close()
    head, _, content = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(content or b"{}")


async def rater(port, campaign_id, token, deadline, stats):
    while time.monotonic() < deadline:
        t0 = time.perf_counter()
        status, body = await request(port, f"/grading/api/campaigns/{campaign_id}/next/", token, {})
        stats["next"].append(time.perf_counter() - t0)
        if status != 200 or body.get("task") is None:
            stats["errors"].append((status, body))
            return
        task_id = body["task"]["id"]
        t0 = time.perf_counter()
        status, body = await request(
            port, f"/grading/api/tasks/{task_id}/submit/", token, {"choice": "left_better"}
        )
        stats["submit"].append(time.perf_counter() - t0)
        if status == 200:
            stats["acked"].add(body["label"])
        else:
            stats["errors"].append((status, body))


def cpu_seconds(pids) -> float:
    """User + system CPU seconds used so far by these processes (Linux /proc)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (clock ticks)
    return total / os.sysconf("SC_CLK_TCK")


def server_pids(server) -> tuple[list[int], list[int]]:
    """gunicorn's master and workers, and the PostgreSQL backends serving the benchmark's
    database: the CPU they use per label is the figure that load from elsewhere cannot skew."""
    children = Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text().split()
    out = subprocess.run(
        [
            "psql",
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-Atc",
            f"SELECT pid FROM pg_stat_activity WHERE datname = '{DB_NAME}'",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return [server.pid, *map(int, children)], list(map(int, out))


def pct(values, q):
    values = sorted(values)
    return 1000 * values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def verify(campaign_id: int, acked: set) -> tuple[int, int]:
    from django.db.models import Count

    from grading.models import Assignment, Item, Label

    stored = set(Label.objects.filter(campaign_id=campaign_id).values_list("id", flat=True))
    lost = len(acked - stored)
    per_pair = (
        Assignment.objects.filter(campaign_id=campaign_id)
        .values("item", "rater")
        .annotate(n=Count("id"))
        .filter(n__gt=1)
        .count()
    )
    over = Item.objects.filter(campaign_id=campaign_id, labelled__gt=3).count()
    return lost, per_pair + over


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--raters", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--items", type=int, default=100_000)
    # gunicorn's advice for sync workers, (2 x cores) + 1, as compose.yaml runs it: a sync
    # worker sits idle while it waits on PostgreSQL and on each client's close.
    parser.add_argument("--web-workers", type=int, default=2 * os.cpu_count() + 1)
    args = parser.parse_args()
    os.environ.update(
        DATABASE_URL=f"{PG}/{DB_NAME}",
        DJANGO_SETTINGS_MODULE="evalhub.settings",
        EVALHUB_HTTPS="false",
        EVALHUB_VAR_DIR=str(ROOT / "var" / "bench"),
        DB_CONN_MAX_AGE="600",
        LOG_LEVEL="WARNING",
    )
    campaign_id, tokens = prepare(args)
    port = 8765
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "evalhub.wsgi",
            "--bind",
            f"127.0.0.1:{port}",
            "--workers",
            str(args.web_workers),
            "--log-level",
            "warning",
        ],
        cwd=ROOT,
        env=os.environ,
    )
    try:
        time.sleep(4)
        # Warm-up, not measured: each gunicorn worker imports the app's lazy modules on its
        # first requests (seconds), which would otherwise land in the p99.
        warm = {"next": [], "submit": [], "acked": set(), "errors": []}

        async def warm_up():
            await asyncio.gather(
                *(rater(port, campaign_id, tok, time.monotonic() + 3, warm) for tok in tokens)
            )

        asyncio.run(warm_up())
        stats = {"next": [], "submit": [], "acked": set(), "errors": []}
        web_pids, db_pids = server_pids(server)
        web_cpu0, db_cpu0 = cpu_seconds(web_pids), cpu_seconds(db_pids)
        cpu0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        deadline = time.monotonic() + args.seconds

        async def run_all():
            await asyncio.gather(
                *(rater(port, campaign_id, tok, deadline, stats) for tok in tokens)
            )

        asyncio.run(run_all())
        wall = time.perf_counter() - t0
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        web_cpu, db_cpu = cpu_seconds(web_pids) - web_cpu0, cpu_seconds(db_pids) - db_cpu0
    finally:
        server.terminate()
        server.wait()
    client_cpu = (cpu1.ru_utime - cpu0.ru_utime + cpu1.ru_stime - cpu0.ru_stime) / wall
    lost, duplicated = verify(campaign_id, stats["acked"] | warm["acked"])
    rate = len(stats["acked"]) / wall
    p99 = max(pct(stats["next"], 0.99), pct(stats["submit"], 0.99))
    print(
        f"raters={args.raters} seconds={wall:.1f} labels={len(stats['acked'])} "
        f"errors={len(stats['errors'])} client_cpu={client_cpu:.0%} of one core"
    )
    n = max(1, len(stats["acked"]))
    print(
        f"server CPU per label: gunicorn {1000 * web_cpu / n:.1f}ms + PostgreSQL "
        f"{1000 * db_cpu / n:.1f}ms ({os.cpu_count()} cores)"
    )
    print(
        f"next-task p50={pct(stats['next'], 0.5):.1f}ms p99={pct(stats['next'], 0.99):.1f}ms; "
        f"submit p50={pct(stats['submit'], 0.5):.1f}ms p99={pct(stats['submit'], 0.99):.1f}ms"
    )
    if stats["errors"]:
        print("first errors:", stats["errors"][:3])
    print(f"labels_per_s={rate:.1f} p99_ms={p99:.1f} lost={lost} duplicated={duplicated}")


if __name__ == "__main__":
    main()
