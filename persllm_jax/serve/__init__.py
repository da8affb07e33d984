"""Talking to trained personas: the generation engine, the OpenAI-compatible server and its web pages, the
terminal chat and the multi-agent simulation.

    engine       KV-cache generation (batched, per-row sampling, stop strings, streaming)
    scoring      likelihoods under the engine: continuation log-probs (answers), next-token log-probs (options)
    personas     loading a base model or a trained run as a Generator; persona stages and their system prompts;
                 [Analysis]/[Response] splitting; streaming deltas
    continuous   the server's generation thread (default engine): a fixed pool of KV slots, requests join and
                 leave at every chunk, rows of different adapters in one batch
    slots        the device side of it: chunked prefill into slots, one decode call over all slots
    adapters     the stacked adapter bank (mixed-adapter batches) and PEFT adapter folders
    scheduler    the previous engine (`--engine static`): batches concurrent requests for the same model
    openai_api   chat and (legacy) completions request parsing, 400s for what is not implemented, errors
    handlers     the generation endpoints (n choices, streaming, disconnects);  responses  their bodies
    metrics      /metrics in the Prometheus text format
    app          the Starlette app, the served models and the uvicorn runner
    chat         the terminal chat session;  simulate  the multi-agent scene
    web/         the chat and /rate pages and the rating database

May import: errors, io, settings, runs, model/ (and data_gen for persona folders). Never train/, export/,
eval/, pipeline/ or cli/ (runs.py is the one way to a trained run).
"""
