"""The node network: jobs, node links and sessions, the registry, the scheduler,
reputation. No web framework and no money here (see ``docs/architecture.md``)."""
