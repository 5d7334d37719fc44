import os
from importlib import import_module

from django.conf import settings
from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "evalhub.settings")
application = get_wsgi_application()
# Import every view now, before any request: the URLconf pulls in torch, pandas and scipy (~2 s
# of CPU), which would otherwise land on whichever request comes first, a health probe included.
# gunicorn runs with --preload, so this happens once in the master and the forked workers share
# the imported modules' memory.
import_module(settings.ROOT_URLCONF)
