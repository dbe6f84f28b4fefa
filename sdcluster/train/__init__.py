"""The training wing (``conf/train/``, ``conf/optim/``): fine-tune the denoiser, resume by default, export.

``loop`` is the job function (:func:`~sdcluster.train.loop.train`), the same on every rank. It works on a
``trainer`` (Accelerator, models, EMA, optimizer, schedule, built once) and asks the ``checkpointer`` to load
and save (it owns choosing, verifying, loading, saving, pruning and setting aside; ``step_folders`` is the
on-disk format). ``method`` is what a run trains (every denoiser weight, or LoRA adapters: two siblings
behind one protocol), chosen once and asked by the others; the model's family (SD 1.x/2.x or SDXL,
:mod:`sdcluster.models.family`) says how it is conditioned, which objective it is trained on and how it is
saved. ``strategy`` is how the trained weights live on the ranks (whole on each, DDP, or sharded,
FSDP), asked the same way. ``loss`` is the denoising loss and the objectives, ``ema`` the moving
average and its weight swap,
``validation`` the held-out loss and images,
``export`` the diffusers pipeline or LoRA file at the end, ``metrics`` the run's ``metrics.jsonl`` and
``tracking`` TensorBoard/W&B. What the loop reads comes from :mod:`sdcluster.data`; submission lives in
:mod:`sdcluster.cluster`, signals and requeue inside a job in :mod:`sdcluster.runtime`. Nothing is
imported here, so importing the wing does not import torch.

The top of the job's work: above models, data, generate (validation images) and the runtime's base; only
the job callables, the login side and the entry points import it.

May import: ``config``, ``models``, ``data``, ``generate``, ``runtime.distributed``, ``runtime.ownership``,
``runtime.requeue``, ``runtime.step_events``, ``atomic``, ``derive``, ``identity``, ``model_source``,
``paths``, ``progress``, ``redaction``, ``sealed``.
"""
