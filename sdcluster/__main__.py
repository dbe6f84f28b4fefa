"""``python -m sdcluster``: the ``sdcluster`` command (:mod:`sdcluster.cli`), off PATH too is not on PATH."""

from sdcluster.cli import entry

if __name__ == "__main__":
    entry()
