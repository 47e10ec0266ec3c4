"""owlrun: the RouteCat provider agent, and the node wire protocol it shares with the gateway."""

__version__ = "0.1.0"
