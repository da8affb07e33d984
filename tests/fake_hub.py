"""A small fake Hugging Face hub on 127.0.0.1 for push tests: the endpoints `create_repo` and `upload_folder` use
(repo creation, README metadata validation, preupload, commit), every request recorded (method, path, headers,
body). Files are answered as `regular` uploads so their bytes arrive inside the commit payload."""

from __future__ import annotations

import base64
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeHub:
    def __init__(self, token: str):
        self.token = token
        self.requests: list[dict] = []
        self.repos: dict[str, dict] = {}
        self.lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _reply(self, code: int, obj):
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _handle(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                with hub.lock:
                    hub.requests.append({"method": self.command, "path": self.path,
                                         "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body})
                if self.headers.get("Authorization") != f"Bearer {hub.token}":
                    return self._reply(401, {"error": "Invalid credentials in Authorization header"})
                path = self.path.split("?")[0]
                if self.command == "POST" and path == "/api/repos/create":
                    req = json.loads(body)
                    repo_id = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
                    with hub.lock:
                        if repo_id in hub.repos:
                            return self._reply(409, {"error": "You already created this model repo",
                                                 "url": f"http://{self.headers['Host']}/{repo_id}"})
                        private = bool(req.get("private")) or req.get("visibility") == "private"
                        hub.repos[repo_id] = {"private": private, "files": {}, "commits": []}
                    return self._reply(200, {"url": f"http://{self.headers['Host']}/{repo_id}"})
                if self.command == "POST" and path == "/api/validate-yaml":
                    return self._reply(200, {"errors": [], "warnings": []})
                m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit)/([^/]+)", path)
                if self.command == "POST" and m:
                    repo_id, what = m.group(1), m.group(2)
                    if repo_id not in hub.repos:
                        return self._reply(404, {"error": "Repository not found"})
                    if what == "preupload":
                        files = json.loads(body)["files"]
                        return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                            "shouldIgnore": False, "oid": None} for f in files]})
                    lines = [json.loads(ln) for ln in body.decode().splitlines() if ln.strip()]
                    with hub.lock:
                        repo = hub.repos[repo_id]
                        for item in lines:
                            if item["key"] == "file":
                                v = item["value"]
                                repo["files"][v["path"]] = base64.b64decode(v["content"])
                            elif item["key"] == "header":
                                repo["commits"].append(item["value"].get("summary"))
                    oid = f"{len(repo['commits']):040x}"
                    return self._reply(200, {"commitUrl": f"http://{self.headers['Host']}/{repo_id}/commit/{oid}",
                                             "commitOid": oid, "pullRequestUrl": None})
                return self._reply(404, {"error": f"fake hub: no route for {self.command} {path}"})

            do_GET = do_POST = do_PUT = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
