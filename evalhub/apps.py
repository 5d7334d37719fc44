from django.apps import AppConfig


class EvalHubConfig(AppConfig):
    name = "evalhub"
    verbose_name = "EvalHub"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Job kinds register themselves in core.jobs.KINDS when their module is imported;
        # the web process submits jobs too, so it must know them without a worker.
        from evalhub import tasks  # noqa: F401
        from grading import tasks as grading_tasks  # noqa: F401
