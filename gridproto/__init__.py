"""Wire formats shared by the gateway, the node agent and the client.

Nothing here imports Django or torch, so every side can depend on it.
"""

PROTOCOL_VERSION = 1
