"""The reproduce recipe (`persllm reproduce`): persona materials -> corpus -> SFT -> DPO -> export -> eval ->
report as resumable stages with markers.

    config.py   the recipe's config (DEFAULTS, includes, --set) and each stage's own config resolved from it
    stages.py   the stages, their keys and markers, skipping and resuming
    report.py   the stage table and headline figures

May import every library subpackage (data_gen, train/, export/, eval/, runs, model/); never cli/.
"""
