"""Grid node agent: connects out to a gateway, stores models and runs
inference requests.

The agent imports torch but never Django, so a node needs only the packages in
``nodeagent`` and ``gridproto``.
"""

__version__ = "0.1.0"
