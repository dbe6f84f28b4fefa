"""Stage a hub model ahead of time, on a login node that has the hub, for jobs that will not.

``launch`` stages by itself; this does the same alone (same config tree, same checks, same cache), e.g. from
a node with internet before launching from one without, or to warm a shared ``model.cache_dir``.

    python -m sdcluster.models fetch CompVis/stable-diffusion-v1-4
    python -m sdcluster.models fetch model=sd14 model.revision=v1.4 model.cache_dir=/shared/hf
    python -m sdcluster.models fetch model=sd15 model.variant=fp16
    python -m sdcluster.models fetch model=sdxl model.vae_path=madebyollin/sdxl-vae-fp16-fix   # and its VAE

It prints the commit the revision resolved to and the local folder (of the model, and of a hub VAE). Exit 2
on a configuration error.

    python -m sdcluster.models push outputs/runs/NAME-HASH --repo you/my-lora   # publish a finished run

``push`` (:mod:`sdcluster.models.push`) uploads a run's export and model card with the token of the
environment; exit 2, before anything is uploaded, when something stops it.
"""

from __future__ import annotations

import argparse
import sys

from sdcluster.config import ConfigError
from sdcluster.models import push


def fetch(target: str, overrides: list[str]) -> int:
    from sdcluster.compose import compose  # Hydra: only for this command
    from sdcluster.model_source import is_hub_id
    from sdcluster.models.hub import stage, stage_vae
    from sdcluster.models.load import check_model_source
    from sdcluster.redaction import reject_secrets_in_arguments

    reject_secrets_in_arguments([target, *overrides])
    # a bare hub id is shorthand for model.path=ID (named after it, as a run would be)
    extra = [target] if "=" in target else [f"model.path={target}", f"model.name={target.split('/')[-1]}"]
    model = compose(extra + overrides).model
    check_model_source(model)
    hub_vae = model.vae_path is not None and is_hub_id(model.vae_path)
    if not is_hub_id(model.path) and not hub_vae:
        raise ConfigError(
            f"model.path: {model.path!r} is not a hub model (it is built or read locally): nothing to fetch. "
            "Fix: give a hub id such as CompVis/stable-diffusion-v1-4, or model=sd14"
        )
    staged = [stage(model, say=print)] if is_hub_id(model.path) else []
    staged += [stage_vae(model, say=print)] if hub_vae else []
    for one in staged:
        state = "from the cache (hub unreachable)" if one.offline else "complete"
        print(f"{one.repo_id} {one.revision}: commit {one.commit} ({len(one.files)} files, {state})")
        print(one.folder)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdcluster.models", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    cmd = sub.add_parser("fetch", help="resolve, check and download a hub model into model.cache_dir")
    cmd.add_argument("target", help="a hub id (owner/name) or model=NAME")
    cmd.add_argument("overrides", nargs="*", help="more config overrides, e.g. model.revision=REV")
    push.add_command(sub)
    args = parser.parse_args(argv)
    if args.command == "push":
        return push.command(args)
    try:
        return fetch(args.target, args.overrides)
    except ConfigError as err:
        print(f"sdcluster: configuration error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
