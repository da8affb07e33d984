"""Training: the SFT and DPO trainers, their data, the shared loop, sharding, checkpoints and the plan.

    config.py       TrainConfig / DPOConfig schemas (loaded by persllm_jax.settings)
    data.py         SFT rows -> tokens with assistant masks -> packed rows
    sft.py          the pure SFT train step, optimizer, state init, FLOPs per token
    loss.py         chunked token log-probs (no [T, V] logits), SFT's trained-position gather
    dpo_data.py     preference pairs -> shared-prompt packed rows
    dpo.py          the DPO losses and step, the reference, precomputed reference log-probs
    loop.py         the loop SFT and DPO share: resume, metrics, checkpoints, stop on preemption
    preemption.py   SIGTERM / orbax's multi-host signal -> checkpoint the step reached, raise Preempted
    sharding.py     mesh, the parameter-name -> PartitionSpec rules, batch placement
    distributed.py  multi-host initialisation
    checkpoint.py   orbax save / restore
    plan.py         compile the train step ahead of time and account its memory
    tpu_plan.py     the SFT and DPO steps compiled by the TPU compiler (libtpu, no TPU), in a worker
    tpu_report.py   its roofline (tokens/s, MFU) and report
    hlo_stats.py    which dtypes a compiled HLO module's matmuls multiply

May import: errors, io, settings, runs, model/. Never export/, serve/, eval/, pipeline/ or cli/.
"""
