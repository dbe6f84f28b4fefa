"""The memory plan: each GPU's bytes for a training config, computed on the login node before the queue.

``sizes`` counts every component's parameters from the model folder's configs on torch's meta device (no
weight is read), and LoRA's adapters as peft injects them; ``activations`` reads the activation bytes
measured once per model shape and resolution (``sdcluster/assets/memory/activations.json``, written by
``benchmarks/memory_plan.py``) and scales them to other micro-batches and resolutions by a stated rule;
``budget`` adds the parts up (weights, gradients, optimizer state, EMA, frozen parts, activations) for a
strategy, world size, optimizer, mixed precision, EMA offload and gradient checkpointing; ``fit`` reads those
settings from a config, refuses a plan above ``cluster.gpu_mem_gb`` and finds the cheapest change that fits
by planning each candidate again. ``python -m sdcluster.plan [overrides]`` (``__main__``) prints the table.

Nothing here imports torch at module level: the launch imports it only to plan (inside the functions).
It sits above the models wing and below the login side of the cluster wing (the preflight and the dry run).
"""
