"""Shared fixtures: personas, real service processes (gunicorn, Celery workers), the browser."""

import os

import pytest
from django.contrib.auth.models import Group

from tests.factories import UserFactory

# Playwright runs an event loop in the test thread; Django's ORM refuses that unless told.
os.environ.setdefault("DJANGO_ALLOW_ASYNC_UNSAFE", "true")


def pytest_collection_modifyitems(config, items):
    """``@pytest.mark.gpu`` tests skip where there is no CUDA device (torch imported only then)."""
    gpu = [item for item in items if "gpu" in item.keywords]
    if gpu:
        import torch

        if not torch.cuda.is_available():
            for item in gpu:
                item.add_marker(pytest.mark.skip(reason="needs CUDA"))


def _persona(username: str, *roles: str):
    user = UserFactory(username=username)
    for role in roles:
        user.groups.add(Group.objects.get_or_create(name=role)[0])
    return user


@pytest.fixture
def alice(db):
    return _persona("alice", "rater")


@pytest.fixture
def bob(db):
    return _persona("bob", "rater")


@pytest.fixture
def carol(db):
    return _persona("carol", "researcher")


@pytest.fixture
def admin_user(db):
    return _persona("root", "admin")


@pytest.fixture
def login(client):
    def login_as(user):
        client.force_login(user)
        return client

    return login_as


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args):
    return {
        **browser_type_launch_args,
        "executable_path": "/usr/bin/chromium",
        "args": [
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
        ],
    }


@pytest.fixture(autouse=True)
def fast_password_hashing(settings):
    # PBKDF2 costs ~0.5 s a user on this CPU; tests create many users and don't test hashing.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture(scope="session")
def inference_app():
    """A real inference server (``models.serving``) on a free local port, in a thread of the
    test process: its models load once per session, like the server's own process does."""
    import threading

    from models.serving.app import InferenceServer
    from models.serving.server import make_http_server

    app = InferenceServer(max_batch=8, token="test-inference-token")
    http = make_http_server(app, "127.0.0.1", 0)
    threading.Thread(target=http.serve_forever, name="inference", daemon=True).start()
    app.url = f"http://127.0.0.1:{http.server_address[1]}"
    yield app
    http.shutdown()
    app.models.clear()


@pytest.fixture
def inference_server(inference_app, settings):
    """/v1 forwards to ``inference_app`` for this test."""
    settings.INFERENCE_URL = inference_app.url
    settings.INFERENCE_TOKEN = inference_app.token
    return inference_app
