"""sdcluster's Hydra launcher plugin: Hydra discovers launchers in the ``hydra_plugins`` namespace."""
