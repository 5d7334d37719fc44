"""Settings read from the environment, the production check, and the library boundaries."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured

from evalhub import settings as s

ROOT = Path(__file__).resolve().parent.parent


def test_env_helpers_parse_and_fail_loudly(monkeypatch):
    monkeypatch.setenv("X_BOOL", "Yes")
    monkeypatch.setenv("X_INT", "12")
    monkeypatch.setenv("X_LIST", "a.example, b.example,")
    assert s.env_bool("X_BOOL", False) is True
    assert s.env_int("X_INT", 0) == 12
    assert s.env_list("X_LIST", []) == ["a.example", "b.example"]
    monkeypatch.setenv("X_BOOL", "maybe")
    monkeypatch.setenv("X_INT", "twelve")
    with pytest.raises(ImproperlyConfigured, match="X_BOOL"):
        s.env_bool("X_BOOL", False)
    with pytest.raises(ImproperlyConfigured, match="X_INT"):
        s.env_int("X_INT", 0)


def test_secrets_can_come_from_a_file(monkeypatch, tmp_path):
    (tmp_path / "key").write_text("from-a-file\n")
    monkeypatch.delenv("SECRET_KEY", raising=False)
    monkeypatch.setenv("SECRET_KEY_FILE", str(tmp_path / "key"))
    assert s.env_str("SECRET_KEY") == "from-a-file"


def _manage(args: list[str], env: dict) -> subprocess.CompletedProcess:
    base = {
        k: v
        for k, v in os.environ.items()
        if k
        not in (
            "DEBUG",
            "EVALHUB_HTTPS",
            "SECRET_KEY",
            "EVALHUB_MANIFEST_STATIC",
            "DJANGO_ALLOW_ASYNC_UNSAFE",
        )
    }
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


PRODUCTION_ENV = {
    "DATABASE_URL": "postgres://evalhub@db.internal:5432/evalhub",
    "CELERY_BROKER_URL": "redis://redis.internal:6379/0",
    "SECRET_KEY": "x7$Vq!0pL3s9-Zr2aWm8YtE4uN6cB1dKfHjG5hRoQiS0vXyUeTbPwAlMnCzDkFg",
    "ALLOWED_HOSTS": "evalhub.example.org",
    "EVALHUB_HTTPS": "true",
}


def test_check_deploy_is_clean_with_production_settings():
    result = _manage(["check", "--deploy", "--fail-level", "WARNING"], PRODUCTION_ENV)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


def test_debug_is_off_unless_asked_for():
    code = "from django.conf import settings; print(settings.DEBUG)"
    result = _manage(["shell", "--no-imports", "-c", code], {})
    assert result.stdout.strip().splitlines()[-1] == "False", result.stderr


def test_a_malformed_database_url_stops_start_up_with_a_clear_error():
    result = _manage(["check"], {"DATABASE_URL": "nosuchdb://x"})
    assert result.returncode != 0
    assert "DATABASE_URL is malformed" in result.stderr


def test_models_and_suites_never_import_django():
    code = (
        "import sys, importlib\n"
        "for name in ('models', 'suites'):\n"
        "    importlib.import_module(name)\n"
        "    path = sys.modules[name].__path__\n"
        "    for sub in __import__('pkgutil').walk_packages(path, name + '.'):\n"
        "        importlib.import_module(sub.name)\n"
        "assert 'django' not in sys.modules, sorted(m for m in sys.modules if 'django' in m)\n"
        "print('clean')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and result.stdout.strip() == "clean", result.stderr[-3000:]


def test_compose_runs_the_commands_the_integration_tests_run():
    import yaml

    from tests.services import BEAT_ARGS, INFERENCE_ARGS, WEB_ARGS, WORKER_ARGS

    services = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    web = [a.format(bind="0.0.0.0:8000") for a in WEB_ARGS]
    assert services["web"]["command"] == ["python", *web]
    assert services["worker"]["command"] == ["python", *WORKER_ARGS]
    assert services["beat"]["command"] == ["python", *BEAT_ARGS]
    assert services["inference"]["command"] == ["python", *INFERENCE_ARGS]
    assert "healthcheck" in services["inference"]
    assert {"postgres", "redis"} <= set(services)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at module level or inside functions, with ``from m import
    x`` counted as both ``m`` and ``m.x`` (x may be a submodule)."""
    import ast

    name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            module = ".".join([*base, node.module or ""]).strip(".") if node.level else node.module
            found |= {module, *(f"{module}.{alias.name}" for alias in node.names)}
    return found


def _import_graph(packages: tuple[str, ...]) -> dict[str, set[str]]:
    """module → the modules of ``packages`` it imports (migrations left out: generated)."""
    graph = {}
    for package in packages:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "migrations" in path.parts:
                continue
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(
                ".__init__"
            )
            graph[module] = {m for m in _imports(path) if m.split(".")[0] in packages}
    return graph


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph, as a path that ends where it starts; None when acyclic."""
    state: dict[str, str] = {}  # "open" while on the current path, then "done"

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return [*path[path.index(nxt) :], nxt] if nxt in path else [node, nxt]
            if nxt not in state and (found := visit(nxt, [*path, nxt])):
                return found
        state[node] = "done"
        return None

    for start in sorted(edges):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


PACKAGES = ("core", "evalhub", "grading", "models", "suites")


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b", "c"}, "b": {"c"}}) is None


def test_packages_import_each_other_in_one_direction_only():
    """core ← grading ← evalhub (and models, suites below all three), counting imports inside
    functions too: a deferred import is still a dependency."""
    edges: dict[str, set[str]] = {}
    for module, targets in _import_graph(PACKAGES).items():
        source = module.split(".")[0]
        edges.setdefault(source, set()).update(
            t.split(".")[0] for t in targets if t.split(".")[0] != source
        )
    assert _cycle(edges) is None, edges
    assert "evalhub" not in edges["grading"] and not edges["core"] & {"evalhub", "grading"}


def test_modules_inside_evalhub_import_each_other_without_a_cycle():
    graph = _import_graph(PACKAGES)
    modules = {m for m in graph if m.startswith("evalhub")}
    # `from evalhub import x` names the module evalhub.x; keep the most specific module named.
    edges = {
        m: {t if t in modules else t.rpartition(".")[0] for t in graph[m]} & modules - {m}
        for m in modules
    }
    edges = {m: {t for t in targets if t != "evalhub"} for m, targets in edges.items()}
    assert _cycle(edges) is None
