import getpass

from django.core.management.base import BaseCommand, CommandError
from django.db.models import Count, Q

from apps.registry import operations
from apps.registry.models import Node

COLUMNS = "{id:>4}  {name:<20} {status:<9} {load:<9} {models:>6}  {last_heartbeat:<17}"


class Command(BaseCommand):
    help = (
        "List nodes, or drain, undrain or disconnect one by name. A draining node finishes its running "
        "jobs and gets no new work; a disconnected agent does not reconnect until it is restarted."
    )

    def add_arguments(self, parser):
        actions = parser.add_subparsers(
            dest="action", required=True, metavar="{list,drain,undrain,disconnect}"
        )
        actions.add_parser(
            "list", help="list every node with its status, load and ready models"
        )
        for action, text in (
            (
                "drain",
                "stop sending new work to an online node and re-place its models",
            ),
            ("undrain", "return a draining node to service"),
        ):
            actions.add_parser(action, help=text).add_argument(
                "name", help="the node's name"
            )
        disconnect = actions.add_parser(
            "disconnect", help="ask a node's agent (or every agent) to disconnect"
        )
        disconnect.add_argument("name", nargs="?", help="the node's name")
        disconnect.add_argument(
            "--all",
            action="store_true",
            help="disconnect every node that is not offline",
        )
        disconnect.add_argument(
            "--reason",
            default=operations.DEFAULT_REASON,
            help="sent to the agent and logged",
        )

    def handle(self, *args, **options):
        actor = f"manage.py by {getpass.getuser()}"
        action = options["action"]
        if action == "list":
            self._list()
        elif action == "drain":
            self._drain(options["name"], actor)
        elif action == "undrain":
            self._undrain(options["name"], actor)
        else:
            self._disconnect(options["name"], options["all"], options["reason"], actor)

    def _list(self) -> None:
        nodes = Node.objects.annotate(
            ready=Count("placements", filter=Q(placements__status="ready"))
        ).order_by("name")
        self.stdout.write(
            COLUMNS.format(
                id="ID",
                name="NAME",
                status="STATUS",
                load="LOAD",
                models="MODELS",
                last_heartbeat="LAST HEARTBEAT",
            )
        )
        for node in nodes:
            heartbeat = (
                node.last_heartbeat.strftime("%Y-%m-%d %H:%M")
                if node.last_heartbeat
                else "-"
            )
            row = COLUMNS.format(
                id=node.pk,
                name=node.name,
                status=node.status,
                load=f"{node.in_flight}/{node.concurrency}",
                models=node.ready,
                last_heartbeat=heartbeat,
            )
            self.stdout.write(row.rstrip())

    def _node(self, name: str | None) -> Node:
        if not name:
            raise CommandError(
                "name a node, such as `manage.py nodes drain node-a`; `manage.py nodes list` shows them"
            )
        node = Node.objects.filter(name=name).first()
        if node is None:
            raise CommandError(
                f"node {name!r} not found; `manage.py nodes list` shows the nodes"
            )
        return node

    def _drain(self, name: str, actor: str) -> None:
        node = self._node(name)
        if operations.drain_node(node_id=node.pk, actor=actor):
            self.stdout.write(
                f"node {name} is draining: running jobs finish, new work goes elsewhere"
            )
            return
        node.refresh_from_db(fields=["status"])
        if node.status == Node.Status.DRAINING:
            self.stdout.write(f"node {name} is already draining")
            return
        raise CommandError(
            f"node {name} is {node.status}; only an online node can be drained"
        )

    def _undrain(self, name: str, actor: str) -> None:
        node = self._node(name)
        if operations.resume_node(node_id=node.pk, actor=actor):
            node.refresh_from_db(fields=["status"])
            self.stdout.write(f"node {name} is back in service as {node.status}")
        else:
            self.stdout.write(
                f"node {name} is {node.status}, not draining; nothing to do"
            )

    def _disconnect(
        self, name: str | None, every: bool, reason: str, actor: str
    ) -> None:
        if every:
            if name:
                raise CommandError("pass a node name or --all, not both")
            count = operations.disconnect_all(actor=actor, reason=reason)
            self.stdout.write(
                f"asked {count} nodes to disconnect; they are marked offline"
            )
            return
        node = self._node(name)
        delivered = operations.disconnect_node(
            node_id=node.pk, actor=actor, reason=reason
        )
        if delivered:
            self.stdout.write(
                f"node {name}: its agent was asked to disconnect; the node is marked offline"
            )
        else:
            self.stdout.write(
                f"node {name}: no agent connection took the request; the node is marked offline"
            )
