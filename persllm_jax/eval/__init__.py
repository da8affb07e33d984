"""Evaluation of personified models (paper §3): distinction (BLEU intra / stage / inter), knowledge and attitude
precision with an LLM judge, anti-induction, a Big Five questionnaire scored offline by option likelihood
(consistency, dynamic development, distinction), style similarity, point-in-time consistency (does the persona at
a stage know what it knew then, and nothing after), human ratings from /rate, and a report with plots.

    evaluate     the `persllm eval` pipeline (config, answers, every metric, results.json) and `compare`
    runner       the systems under evaluation (base + persona prompt, trained runs) and batched answers
    corpus       the corpus test split;  distinction, precision, anti_induction, bigfive, style  the metrics
    timeline     point-in-time probes (TimeChara's kinds): judge-free answer likelihoods, leakage matrix,
                 premise calibration, and the judged variant
    human        /rate judgements: win rates, Bradley-Terry, agreement, and their report section
    report       report.md from results.json;  plots  every figure (matplotlib, headless)

May import: errors, io, settings, runs, model/, serve/ (generation and the rating store) and data_gen (the
judge's backends, the probe files). Never train/, export/, pipeline/ or cli/.
"""

from persllm_jax.errors import PersllmError


class EvalError(PersllmError, ValueError):
    """Bad input to `persllm eval` (reported as a clear one-line error)."""
