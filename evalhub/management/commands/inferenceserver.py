"""Run the inference server (``models/serving``) for this installation: /v1 forwards to it.

It listens at once and loads the models named by ``--preload`` (default: every registered
policy model of the built-in engine, up to the cache budget) in the background; a request for
a model still loading waits for it.
"""

from urllib.parse import urlsplit

from django.conf import settings
from django.core.management.base import BaseCommand

from evalhub.inference import spec_for
from evalhub.models import ModelVersion
from models.serving.app import Spec
from models.serving.server import serve


class Command(BaseCommand):
    help = "Run the inference server that holds the loaded models behind /v1."

    def add_arguments(self, parser):
        url = urlsplit(settings.INFERENCE_URL)
        parser.add_argument("--host", default=url.hostname or "127.0.0.1")
        parser.add_argument("--port", type=int, default=url.port or 8100)
        parser.add_argument(
            "--preload",
            nargs="*",
            default=None,
            help="registered model names to load at start (default: the built-in policies)",
        )
        parser.add_argument("--max-batch", type=int, default=settings.INFERENCE_MAX_BATCH)
        parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")

    def handle(self, *args, host, port, preload, max_batch, threads, **options):
        models = ModelVersion.objects.filter(kind=ModelVersion.POLICY, backend="builtin")
        if preload is not None:
            models = ModelVersion.objects.filter(name__in=preload)
            missing = set(preload) - set(models.values_list("name", flat=True))
            if missing:
                self.stderr.write(f"not registered, not preloaded: {sorted(missing)}")
        specs = [Spec.from_json(spec_for(m)) for m in models]
        serve(
            host,
            port,
            named={},
            preload=specs,
            max_batch=max_batch,
            cache_bytes=settings.MODEL_CACHE_BYTES,
            token=settings.INFERENCE_TOKEN,
            threads=threads,
        )
