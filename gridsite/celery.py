"""The Celery app: placement tasks and the periodic sweeps run by beat."""

import os

from celery import Celery
from celery.signals import setup_logging

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "gridsite.settings")

app = Celery("gridsite")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@app.on_after_finalize.connect
def schedule_sweeps(sender, **kwargs):
    from django.conf import settings

    interval = settings.GRID["HEARTBEAT_INTERVAL"]
    sender.add_periodic_task(interval, sender.signature("apps.inference.tasks.sweep_nodes"), name="sweep nodes")
    sender.add_periodic_task(max(1.0, interval), sender.signature("apps.inference.tasks.sweep_jobs"), name="sweep jobs")
    # At least twice per PLACEMENT_TIMEOUT, so a stuck transfer fails close to its timeout.
    placements = min(30.0, max(1.0, settings.GRID["PLACEMENT_TIMEOUT"] / 2))
    sender.add_periodic_task(placements, sender.signature("apps.inference.tasks.sweep_placements"), name="sweep placements")
    sender.add_periodic_task(5.0, sender.signature("apps.inference.tasks.heal_replicas"), name="heal replicas")


if os.environ.get("GRID_LOG_FORMAT", "").strip().lower() == "json":

    @setup_logging.connect
    def log_as_json(**kwargs):
        """Use settings.LOGGING (JSON lines) instead of Celery's own text format.

        Connected only for GRID_LOG_FORMAT=json, because a connected receiver
        replaces all of Celery's logging setup, --loglevel included.
        """
        import logging.config

        from django.conf import settings

        logging.config.dictConfig(settings.LOGGING)
