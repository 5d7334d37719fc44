"""The embedded profile grades on SQLite: the rater API end to end (token auth, the access
funnel, claiming, submitting, a double submit, a late label) on a real SQLite file.

PostgreSQL runs the single-statement claim and submit; SQLite runs the ORM path and the plain
row loaders with SQLite's own converters (datetimes come back as text there). Run in a child
process because the test database of this session is PostgreSQL.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import json
from datetime import timedelta

import django
django.setup()
from django.core.management import call_command
call_command("migrate", verbosity=0)
from django.contrib.auth.models import Group, User
from django.test import Client
from django.utils import timezone
from core.models import ApiToken
from grading.models import Assignment, Campaign, Item, Label, Response

campaign = Campaign.objects.create(name="c", kind="side_by_side", overlap=2, gold_rate=0.0)
for i in range(3):
    item = Item.objects.create(campaign=campaign, prompt=f"Prompt {i}")
    Response.objects.bulk_create([Response(item=item, position=p, text=f"answer {p} of {i}",
                                           model_name=f"secret-model-{p}") for p in (0, 1)])
rater = Group.objects.create(name="rater")
clients = []
for name in ("ann", "ben"):
    user = User.objects.create(username=name)
    user.groups.add(rater)
    clients.append(Client(HTTP_AUTHORIZATION=f"Bearer {ApiToken.issue(user=user, name='t')[1]}"))
ann, ben = clients
out = {"labels": [], "bodies": []}

def post(client, path, body):
    r = client.post(path, json.dumps(body), content_type="application/json")
    out["bodies"].append(r.content.decode())
    return r.status_code, r.json()

status, first = post(ann, f"/grading/api/campaigns/{campaign.pk}/next/", {})
out["first"] = [status, sorted(first["task"])]
status, again = post(ann, f"/grading/api/campaigns/{campaign.pk}/next/", {})
out["same_live_task"] = again["task"]["id"] == first["task"]["id"]
status, body = post(ann, f"/grading/api/tasks/{first['task']['id']}/submit/",
                    {"choice": "left_better"})
status2, body2 = post(ann, f"/grading/api/tasks/{first['task']['id']}/submit/",
                      {"choice": "right_better"})
out["double_submit"] = [status, status2, body["label"] == body2["label"]]
out["ben_on_anns_task"] = post(ben, f"/grading/api/tasks/{first['task']['id']}/submit/",
                               {"choice": "left_better"})[0]
# A late label: Ben's lease ran out before he submitted; the item still needs a label.
status, task = post(ben, f"/grading/api/campaigns/{campaign.pk}/next/", {})
Assignment.objects.filter(pk=task["task"]["id"]).update(
    expires_at=timezone.now() - timedelta(seconds=5))
status, body = post(ben, f"/grading/api/tasks/{task['task']['id']}/submit/",
                    {"choice": "tie_both_good"})
out["late"] = [status, body.get("late")]
while True:  # drain the campaign
    for client in (ann, ben):
        status, task = post(client, f"/grading/api/campaigns/{campaign.pk}/next/", {})
        if task["task"] is None:
            break
        url = f"/grading/api/tasks/{task['task']['id']}/submit/"
        post(client, url, {"choice": "left_slightly_better"})
    else:
        continue
    break
out["labelled"] = sorted(Item.objects.values_list("labelled", flat=True))
out["labels"] = Label.objects.count()
print("RESULT" + json.dumps(out))
"""


def test_the_rater_api_grades_a_campaign_on_sqlite(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL",)}
    env.update(
        DJANGO_SETTINGS_MODULE="evalhub.settings",
        EVALHUB_VAR_DIR=str(tmp_path),
        EVALHUB_HTTPS="false",
        ALLOWED_HOSTS="testserver",
    )
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert out["first"] == [200, ["context", "expires_at", "id", "kind", "left", "prompt", "right"]]
    assert out["same_live_task"]
    assert out["double_submit"] == [200, 200, True]
    assert out["ben_on_anns_task"] == 404
    assert out["late"] == [200, True]
    assert out["labelled"] == [2, 2, 2] and out["labels"] == 6
    assert not any("secret-model" in body for body in out["bodies"])
