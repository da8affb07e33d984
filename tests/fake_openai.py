"""A fault-injecting OpenAI-compatible server on 127.0.0.1 for tests and benchmarks: deterministic canned
answers for the data_gen prompts, and (per request body, on its first attempt) 429, 500, replies slower
than the client's timeout, or malformed bodies. Every request is logged."""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def _h(text: str) -> float:
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 2**32


def canned_answer(messages: list[dict]) -> str:
    """A deterministic answer shaped like what each data_gen prompt asks for."""
    system = next((m["content"] for m in messages if m["role"] == "system"), "")
    user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
    key = system + "\x00" + user
    u = _h(key)
    words = re.findall(r"[A-Za-z][A-Za-z'-]+", user) or ["things"]
    start = int(_h("w" + key) * len(words))
    window = " ".join((words * 3)[start:start + 7])
    if "[Consistent]" in user:  # data_gen.probes_llm's annotator builder
        if u < 0.05:
            return "I would rather not write that."  # unparsable: counted as rejected
        return (f"[Question] What do you know of {window}?\n[Consistent] I can speak of {window} as I know it then.\n"
                f"[Inconsistent] I know all about {window}, even what comes later (#{int(u * 1e6)}).")
    if "objective or subjective" in system:
        return "Subjective." if re.search(r"\b(I|my|me)\b", user) else "objective"
    if "[Analysis]" in system or "[分析]" in system:
        if u < 0.04:
            return "I think the user is asking something, and here is my view without any tags."
        if u < 0.07:
            return "[Analysis] Refuse. [Response] As an AI language model, I cannot pretend to be a person."
        label = re.search(r"Now it's ([^.]+)\.", system)
        label = label.group(1) if label else "today"
        return (f"[Analysis] The user talks about {window}; I check it against what I know in {label}. "
                f"[Response] Well, {window}? In {label} I would say it plainly: {' '.join(words[:5])}, "
                f"and that is my honest view (#{int(u * 1e6)}).")
    if u < 0.05:
        return "What is your favourite season of the year?"  # exact duplicates for the dedup step
    if "contains a mistake" in system:
        return f"Isn't it true that you never cared about {window}, as everyone in Paris says?"
    if "short paragraph" in system:
        return f"I honestly think {window} is overrated. People make too much of it. What do you say?"
    if "raise 1 question" in system:
        return f"Question: What can you tell me about {window}?"
    return f"Reply about {window}."


class FakeOpenAI:
    def __init__(self, latency: float = 0.0, fault_rate: float = 0.0, slow_seconds: float = 1.5,
                 hold_after: int | None = None, answer=canned_answer, reject_auth: bool = False):
        self.latency, self.fault_rate, self.slow_seconds = latency, fault_rate, slow_seconds
        self.hold_after = hold_after
        self.reject_auth = reject_auth  # answer 401 and echo the key back, as some servers do
        self.answer = answer
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.log: list[tuple[str, str]] = []  # (body hash, outcome)
        self.attempts: dict[str, int] = {}
        self.auth_headers: set[str] = set()
        self.bodies: list[dict] = []
        self.server = None

    # outcome of one attempt for a body: faults only on the first attempt, so every item gets through
    def _fault(self, h: str, attempt: int) -> str | None:
        if attempt > 0 or self.fault_rate <= 0:
            return None
        u = _h("fault" + h)
        if u >= self.fault_rate:
            return None
        return ("429", "500", "slow", "malformed", "nochoices")[int(u / self.fault_rate * 5)]

    @property
    def answered(self) -> set[str]:
        with self.lock:
            return {h for h, o in self.log if o == "ok"}

    def count(self, outcome: str) -> int:
        with self.lock:
            return sum(1 for _, o in self.log if o == outcome)

    def start(self) -> str:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _send(self, code: int, body: bytes, ctype="application/json"):
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(body)))
                    if code == 429:
                        self.send_header("Retry-After", "0")
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if not self.path.endswith("/chat/completions"):
                    return self._send(404, b'{"error": {"message": "not found"}}')
                if fake.reject_auth:
                    with fake.lock:
                        fake.log.append(("", "401"))
                    msg = {"error": {"message": f"Incorrect API key provided: {self.headers.get('Authorization')}"}}
                    return self._send(401, json.dumps(msg).encode())
                req = json.loads(raw)
                h = hashlib.sha256(json.dumps({k: req.get(k) for k in ("model", "messages", "max_tokens",
                                   "temperature", "top_p", "seed")}, sort_keys=True).encode()).hexdigest()
                with fake.lock:
                    attempt = fake.attempts.get(h, 0)
                    fake.attempts[h] = attempt + 1
                    fake.auth_headers.add(self.headers.get("Authorization", ""))
                    fake.bodies.append(req)
                fault = fake._fault(h, attempt)
                if fake.latency:
                    time.sleep(fake.latency)
                with fake.lock:  # decide and log in one step, so hold_after is exact under concurrency
                    held = fault is None and fake.hold_after is not None and \
                        sum(1 for _, o in fake.log if o == "ok") >= fake.hold_after
                    fake.log.append((h, "held" if held else fault or "ok"))
                if held:
                    fake.release.wait(60)
                    with fake.lock:
                        fake.attempts[h] -= 1
                    return self._send(503, b'{"error": {"message": "held"}}')
                if fault == "429":
                    return self._send(429, b'{"error": {"message": "rate limited", "type": "rate_limit"}}')
                if fault == "500":
                    return self._send(500, b'{"error": {"message": "boom"}}')
                if fault == "slow":
                    time.sleep(fake.slow_seconds)
                if fault == "malformed":
                    return self._send(200, b'{"id": "x", "choices": [ {"mess')
                if fault == "nochoices":
                    return self._send(200, b'{"id": "x", "object": "chat.completion"}')
                text = fake.answer(req["messages"])
                body = {"id": "chatcmpl-" + h[:12], "object": "chat.completion", "created": 0,
                        "model": req.get("model"),
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                     "finish_reason": "stop"}],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
                self._send(200, json.dumps(body).encode())

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def stop(self):
        self.release.set()
        if self.server:
            self.server.shutdown()
            self.server.server_close()

    def __enter__(self):
        self.url = self.start()
        return self

    def __exit__(self, *exc):
        self.stop()
