"""memtrace bench: Python workloads (stdlib only), the traced process.

    py_service.py service N   a ThreadingHTTPServer on 127.0.0.1; a client
                              process (this file, `client`) sends N requests
                              over 4 keep-alive connections
    py_service.py alloc N     N iterations of allocation-heavy Python code

Protocol: prints "READY" once set up, waits for one byte on stdin (the
tracer attaches meanwhile), works, prints "RESULT <ops per second>", waits
for another byte (or EOF) and exits without finalization.

The service leaks from two lines of do_GET, which a report should name
(marked `# @leak_...`): SESSIONS (a session object per /login, never
closed) and CACHE (a page rendered per distinct /item query, never
evicted); /churn only allocates and frees.
"""

import http.client
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CACHE = {}
SESSIONS = []


class Session:
    def __init__(self, user):
        self.user = user
        self.token = os.urandom(16).hex()
        self.buffer = bytearray(1024)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes: without this, every response
    # waits for the client's delayed ACK.
    disable_nagle_algorithm = True

    def do_GET(self):
        path, _, query = self.path.partition("?")
        if path == "/login":
            SESSIONS.append(Session(query))  # @leak_session
            body = b"ok"
        elif path == "/item":
            page = CACHE.get(query)
            if page is None:
                page = render(query)  # @leak_cache
                CACHE[query] = page
            body = page
        else:
            body = json.dumps({"items": [{"id": i, "name": f"n{i}"} for i in range(20)]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def render(query):
    return ("<html>" + query * 40 + "</html>").encode() * 4


def client(port, n):
    def one(count, base):
        conn = http.client.HTTPConnection("127.0.0.1", port)
        for i in range(count):
            k = base + i
            if k % 10 == 0:
                url = f"/login?user{k}"
            elif k % 10 == 1:
                url = f"/item?{k}"
            else:
                url = "/churn"
            conn.request("GET", url)
            conn.getresponse().read()
        conn.close()

    threads = [threading.Thread(target=one, args=(n // 4, j * n)) for j in range(4)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(f"{4 * (n // 4) / (time.perf_counter() - start):.1f}", flush=True)


def service(n):
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print("READY", flush=True)
    sys.stdin.read(1)
    port = str(server.server_address[1])
    out = subprocess.run(
        [sys.executable, __file__, "client", port, str(n)], capture_output=True, check=True
    )
    return float(out.stdout.split()[-1])


def alloc(n):
    print("READY", flush=True)
    sys.stdin.read(1)
    kept = []
    start = time.perf_counter()
    for i in range(n):
        d = {"id": i, "tags": [str(j) for j in range(8)], "blob": bytes(600)}
        kept.append(d)
        if len(kept) > 1000:
            kept.clear()
    return n / (time.perf_counter() - start)


def main():
    mode, n = sys.argv[1], int(sys.argv[-1])
    if mode == "client":
        client(int(sys.argv[2]), n)
        return
    rate = service(n) if mode == "service" else alloc(n)
    print(f"RESULT {rate:.1f}", flush=True)
    sys.stdin.read(1)
    os._exit(0)


if __name__ == "__main__":
    main()
