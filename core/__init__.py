"""The platform core both Django apps build on: background jobs (``jobs.py``, the Job and
API-token tables in ``models.py``), roles and the permission funnel (``access.py``), and model
instances from raw SQL rows (``rows.py``).

Import direction: ``evalhub`` → ``grading`` → ``core``; ``core`` imports neither app, and
``grading`` never imports ``evalhub`` (tests/test_settings_and_boundaries.py checks it).
"""
