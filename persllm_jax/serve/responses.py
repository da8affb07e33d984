"""OpenAI response bodies: chat completions and (legacy) completions, whole or as stream chunks, with `usage`
and `logprobs` in the shapes the official clients parse."""

from __future__ import annotations

import json
import math


def _token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False) if tokenizer is not None else str(token_id)


def _lp(v: float) -> float:
    return v if math.isfinite(v) else -9999.0  # JSON has no -inf; OpenAI uses -9999.0 for "impossible"


def chat_logprobs(tokenizer, entries: list | None) -> dict | None:
    """`choices[i].logprobs` of chat: {"content": [{token, logprob, bytes, top_logprobs: [...]}]}."""
    if entries is None:
        return None
    content = []
    for token_id, lp, top_ids, top_lps in entries:
        text = _token_text(tokenizer, token_id)
        content.append({"token": text, "logprob": _lp(lp), "bytes": list(text.encode("utf-8")),
                        "top_logprobs": [{"token": (t := _token_text(tokenizer, i)), "logprob": _lp(v),
                                          "bytes": list(t.encode("utf-8"))} for i, v in zip(top_ids, top_lps)]})
    return {"content": content, "refusal": None}


def completion_logprobs(tokenizer, entries: list | None, offset: int = 0) -> dict | None:
    """`choices[i].logprobs` of /v1/completions: parallel lists tokens, token_logprobs, top_logprobs, text_offset."""
    if entries is None:
        return None
    tokens, lps, tops, offsets = [], [], [], []
    for token_id, lp, top_ids, top_lps in entries:
        text = _token_text(tokenizer, token_id)
        tokens.append(text)
        lps.append(_lp(lp))
        tops.append({_token_text(tokenizer, i): _lp(v) for i, v in zip(top_ids, top_lps)})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class Responder:
    """The bodies of one request (chat or completion); ids and timestamps shared by all its chunks."""

    def __init__(self, kind: str, rid: str, created: int, model: str, tokenizer, include_usage: bool):
        self.kind, self.rid, self.created, self.model = kind, rid, created, model
        self.tokenizer, self.include_usage = tokenizer, include_usage
        self.fingerprint = f"persllm-{model}"

    def _logprobs(self, entries, offset: int = 0):
        if self.kind == "chat":
            return chat_logprobs(self.tokenizer, entries)
        return completion_logprobs(self.tokenizer, entries, offset)

    def whole(self, comps: list, prompt_tokens: int) -> dict:
        """The non-streaming body; `comps` are the final Completions by choice index."""
        choices = []
        for i, c in enumerate(comps):
            choice = {"index": i, "logprobs": self._logprobs(c.logprobs), "finish_reason": c.finish_reason}
            if self.kind == "chat":
                choice["message"] = {"role": "assistant", "content": c.text, "refusal": None}
            else:
                choice["text"] = c.text
            choices.append(choice)
        return {"id": self.rid, "object": "chat.completion" if self.kind == "chat" else "text_completion",
                "created": self.created, "model": self.model, "system_fingerprint": self.fingerprint,
                "choices": choices, "usage": usage(prompt_tokens, sum(len(c.token_ids) for c in comps))}

    def chunk(self, index: int | None, text: str | None = None, finish: str | None = None, logprobs=None,
              role: bool = False, offset: int = 0, usage_: dict | None = None) -> str:
        """One SSE event: a choice's delta (`index`), or with index None the final usage-only chunk."""
        if index is None:
            choices = []
        elif self.kind == "chat":
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            choices = [{"index": index, "delta": delta, "logprobs": self._logprobs(logprobs, offset),
                        "finish_reason": finish}]
        else:
            choices = [{"index": index, "text": text or "", "logprobs": self._logprobs(logprobs, offset),
                        "finish_reason": finish}]
        obj = {"id": self.rid, "object": "chat.completion.chunk" if self.kind == "chat" else "text_completion",
               "created": self.created, "model": self.model, "system_fingerprint": self.fingerprint,
               "choices": choices}
        if self.include_usage:
            obj["usage"] = usage_
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


__all__ = ["Responder", "chat_logprobs", "completion_logprobs", "usage"]
