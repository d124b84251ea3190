import getpass

from django.core.management.base import BaseCommand, CommandError
from django.db.models import Prefetch

from apps.inference import operations
from apps.inference.models import Model, Placement
from apps.inference.serializers import model_status

COLUMNS = "{model_id:<32} {owner:<16} {status:<9} {replicas:<8} {size:>12}  {remote:<6}"


class Command(BaseCommand):
    help = "List served models, or delete one and evict it from every node that stores it."

    def add_arguments(self, parser):
        actions = parser.add_subparsers(
            dest="action", required=True, metavar="{list,delete}"
        )
        actions.add_parser(
            "list", help="list every model with its owner, status and ready replicas"
        )
        delete = actions.add_parser(
            "delete", help="evict a model from its nodes and delete it, with its jobs"
        )
        delete.add_argument("model_id")

    def handle(self, *args, **options):
        if options["action"] == "list":
            self._list()
        else:
            self._delete(options["model_id"])

    def _list(self) -> None:
        models = Model.objects.select_related("owner").prefetch_related(
            Prefetch("placements", queryset=Placement.objects.select_related("node"))
        )
        header = COLUMNS.format(
            model_id="MODEL",
            owner="OWNER",
            status="STATUS",
            replicas="READY",
            size="BYTES",
            remote="REMOTE",
        )
        self.stdout.write(header.rstrip())
        for model in models:
            status, _, ready = model_status(model)
            row = COLUMNS.format(
                model_id=model.model_id,
                owner=model.owner.username,
                status=status,
                replicas=f"{ready}/{model.replicas}",
                size=model.size,
                remote="yes" if model.allow_remote_inference else "no",
            )
            self.stdout.write(row.rstrip())

    def _delete(self, model_id: str) -> None:
        model = Model.objects.filter(model_id=model_id).first()
        if model is None:
            raise CommandError(
                f"model {model_id!r} not found; `manage.py models list` shows the models"
            )
        evicted = operations.delete_model(
            model_pk=model.pk, actor=f"manage.py by {getpass.getuser()}"
        )
        nodes = ", ".join(str(node_id) for node_id in evicted) or "none"
        self.stdout.write(f"deleted model {model_id}; eviction sent to nodes: {nodes}")
