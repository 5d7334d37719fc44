"""The ``evalhub`` console script: ``manage.py`` installed in the virtualenv.

``make install`` (``pip install -e .``) puts it at ``.venv/bin/evalhub``; it runs any management
command with EvalHub's settings from any directory (``evalhub evaluate …``, ``evalhub
import_model …``, ``evalhub create_api_token USER``, ``evalhub posttrain …``, ``evalhub
runplatform``). Paths given as arguments are read relative to the current directory, as with
``manage.py``; settings find the clone through the installed package (``settings.BASE_DIR``).
"""

import os
import sys


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "evalhub.settings")
    from django.core.management import ManagementUtility

    argv = list(sys.argv if argv is None else argv)
    utility = ManagementUtility(["evalhub", *argv[1:]])
    utility.prog_name = "evalhub"  # help and errors read "evalhub evaluate", not "manage.py"
    try:
        utility.execute()
    except BrokenPipeError:  # `evalhub jobkinds | head`: the reader left early, as it may
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)


if __name__ == "__main__":
    main()
