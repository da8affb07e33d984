"""Evaluation of personified models (paper §3): distinction (BLEU intra / stage / inter), knowledge and attitude
precision with an LLM judge, anti-induction, a Big Five questionnaire scored offline by option likelihood
(consistency, dynamic development, distinction), style similarity, and a report with plots."""


class EvalError(ValueError):
    """Bad input to `persllm eval` (reported as a clear one-line error)."""
