"""Print the memory plan of a training config: each GPU's bytes by part, as the launch plans them.

    python -m sdcluster.plan                                            # the demo's tiny model
    python -m sdcluster.plan experiment=sd15_full cluster.gpu_mem_gb=24  # does SD 1.5 fit a 24 GiB GPU?
    python -m sdcluster.plan model=sdxl train.strategy=fsdp +cluster=slurm cluster.gpus_per_node=8

Takes the overrides ``python -m sdcluster.launch`` takes (``conf/local/`` applies too). With
``cluster.gpu_mem_gb`` set, a plan above it prints the cheapest change that fits and exits 1. Exit 2 on a
configuration error (or a hub model whose configs are not on this machine: stage it first with
``python -m sdcluster.models fetch``).
"""

from __future__ import annotations

import sys

from sdcluster.config import ConfigError


def main(argv: list[str] | None = None) -> int:
    from sdcluster.compose import compose  # Hydra: only for this command
    from sdcluster.plan.fit import describe, plan_config, refuse_above_budget

    args = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in args):
        print(__doc__)
        return 0
    try:
        cfg = compose(args)
        planned = plan_config(cfg)
        if planned is None:
            raise ConfigError(
                f"model.path: the configs of {cfg.model.path} are not on this machine. Fix: "
                f"python -m sdcluster.models fetch {cfg.model.path} (it stages the model), then plan again"
            )
        for line in describe(planned):
            print(line)
        refuse_above_budget(planned)
    except ConfigError as err:
        fits = "gpu_mem_gb: the training job needs" in str(err)
        print(f"sdcluster: {'does not fit' if fits else 'configuration error'}: {err}", file=sys.stderr)
        return 1 if fits else 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
