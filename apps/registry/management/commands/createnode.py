from django.core.management.base import BaseCommand, CommandError

from apps.registry.models import Node


class Command(BaseCommand):
    help = "Enroll a node and print its token once. Only the token's hash is stored."

    def add_arguments(self, parser):
        parser.add_argument("name")
        parser.add_argument("--rotate", action="store_true", help="issue a new token for an existing node")

    def handle(self, *args, **options):
        name = options["name"]
        node = Node.objects.filter(name=name).first()
        if node is not None:
            if not options["rotate"]:
                raise CommandError(f"node {name!r} exists; pass --rotate to replace its token")
            plain = node.rotate_token()
            # An agent still connected with the old token must not stay on.
            from apps.inference.delivery import send_to_node_sync

            send_to_node_sync(node.pk, {"type": "agent.disconnect", "reason": "the node's token was rotated"})
        else:
            if not 1 <= len(name) <= 100:
                raise CommandError("node name must be 1 to 100 characters")
            node, plain = Node.enroll(name)
        self.stdout.write(plain)
