import os
from importlib import import_module

from django.conf import settings
from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "evalhub.settings")
application = get_wsgi_application()
# Import every view now, while the worker boots and before it accepts connections: the URLconf
# pulls in torch, pandas and scipy (~2 s of CPU), which would otherwise land on whichever request
# comes first, a health probe included.
import_module(settings.ROOT_URLCONF)
