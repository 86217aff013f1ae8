"""A loopback HTTP file server for the streaming tests, run as its own process:

    python tests/http_shard_server.py ROOT PORT_FILE

It serves the files under ROOT (with Range requests and an ETag, as nginx or S3 do) on
127.0.0.1, on a free port written to PORT_FILE. ROOT/_faults.json, read on every request, makes
chosen paths misbehave: {"/train-0003.tar": {"mode": "404"}, ...} with mode

  404     answer 404
  503     answer 503 (a status a retry can cure)
  drop    send the headers and the first `at` bytes, then close the connection
  stall   send the headers and the first `at` bytes, then send nothing for `seconds`
  norange ignore Range requests (send the whole file with 200)

and "times": N to misbehave on the first N requests of that path only (default: always),
counted from the last change of _faults.json; "norange": true ignores Range on every request.
Every request is appended to ROOT/_requests.log as "path range status" lines.
"""
import json
import os
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SEEN: Counter = Counter()  # requests per path since _faults.json last changed
FAULTS_VERSION = [None]
LOCK = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    root = "."

    def log_message(self, *args):  # quiet: the request log is written below
        pass

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        faults = self._faults()
        with LOCK:
            SEEN[path] += 1
            n = SEEN[path]
        fault = faults.get(path, {})
        mode = fault.get("mode") if n <= fault.get("times", float("inf")) else None
        file = os.path.join(self.root, path.lstrip("/"))
        if mode in ("404", "503") or not os.path.isfile(file):
            return self._status(int(mode) if mode in ("404", "503") else 404, path)
        with open(file, "rb") as f:
            data = f.read()
        start = None if mode == "norange" or fault.get("norange") else self._range_start()
        status = 206 if start is not None else 200
        body = data[start or 0:]
        self._log(path, status)
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("ETag", f'"{int(os.path.getmtime(file) * 1e6):x}-{len(data):x}"')
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if mode in ("drop", "stall"):
            self.wfile.write(body[:int(fault.get("at", 0))])
            self.wfile.flush()
            if mode == "stall":
                time.sleep(float(fault.get("seconds", 3600)))
            self.close_connection = True
            return
        self.wfile.write(body)

    def _faults(self):
        """The faults in force; a new _faults.json starts the "times" counts again."""
        file = os.path.join(self.root, "_faults.json")
        try:
            with LOCK:
                version = os.stat(file).st_mtime_ns
                if version != FAULTS_VERSION[0]:
                    FAULTS_VERSION[0] = version
                    SEEN.clear()
            with open(file) as f:
                return json.load(f)
        except (FileNotFoundError, ValueError):
            return {}

    def _range_start(self):
        value = self.headers.get("Range", "")
        if value.startswith("bytes=") and value.endswith("-"):
            return int(value[len("bytes="):-1])
        return None

    def _status(self, code, path):
        self._log(path, code)
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _log(self, path, status):
        with LOCK, open(os.path.join(self.root, "_requests.log"), "a") as f:
            f.write(f"{path} {self.headers.get('Range', '-')} {status}\n")


def main(root, port_file):
    Handler.root = root
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    tmp = port_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(server.server_address[1]))
    os.replace(tmp, port_file)
    server.serve_forever()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
