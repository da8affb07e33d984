"""Talking to trained personas: the generation engine, the OpenAI-compatible server and its web pages, the
terminal chat and the multi-agent simulation.

    engine       KV-cache generation (batched, per-row sampling, stop strings, streaming)
    scoring      likelihoods under the engine: continuation log-probs (answers), next-token log-probs (options)
    personas     loading a base model or a trained run as a Generator; persona stages and their system prompts;
                 [Analysis]/[Response] splitting; streaming deltas
    scheduler    the one generation thread of a server: batches concurrent requests for the same model
    openai_api   chat-completions request parsing and the OpenAI-style errors
    app          the Starlette app, the served models and the uvicorn runner
    chat         the terminal chat session;  simulate  the multi-agent scene
    web/         the chat and /rate pages and the rating database

May import: errors, io, settings, runs, model/ (and data_gen for persona folders). Never train/, export/,
eval/, pipeline/ or cli/ (runs.py is the one way to a trained run).
"""
