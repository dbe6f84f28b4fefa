"""The models wing (``conf/model/``): where Stable Diffusion components come from, whatever the source.

``load`` resolves ``model.path`` (an embedded model, a local diffusers folder or a hub id), checks it on the
login node and loads the components training needs; ``hub`` stages a hub model on the login node (resolved
to a commit, checked, downloaded once) for jobs that read it offline (``python -m sdcluster.models fetch``
does it alone); ``tiny``, ``tiny_sdxl``, ``tiny_sd3`` and ``tiny_flux`` build the embedded random-weight
models offline; ``family`` is what differs between SD 1.x/2.x, SDXL, SD 3.x and FLUX.1; ``samplers`` maps
``generate.scheduler`` names to diffusers' noise-scheduler classes. Training and generation get the same
objects for the tiny model and for SD 1.4: nothing downstream knows which one it got. Nothing is imported
here, so the login node's checks stay light.

Just above the schema; ``python -m sdcluster.models fetch`` (``__main__``) composes a config like the launch.
``push`` publishes a finished run's export on the hub (``python -m sdcluster.models push``).

May import (command: __main__, push): ``models``, ``compose``, ``config``, ``model_source``,
``redaction``, ``paths``.

May import (the rest): ``config``, ``atomic``, ``derive``, ``identity``, ``model_source``, ``paths``.
"""
