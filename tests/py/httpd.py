"""The lab's scripted HTTP/1.1 server (Python's http.server), for the telemetry tests.

    python3 httpd.py HOST PORT

Keep-alive HTTP/1.1. Paths:
  /delay/MS         200 after MS milliseconds, a 2-byte body
  /status/CODE      that status (204 and 304 without a body, others with one)
  /chunked          200 with a chunked body of three chunks
  /big              200 with a 1 MiB body
  POST /upload      reads a fixed-length or chunked body, answers 201 with its length
Prints "listening" when ready, then for each /delay request "served PATH MS": the time in
milliseconds from the moment it had the request to the moment its answer was written, the
server's own account of its delay.
"""
import http.server
import sys
import time


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        pass

    def reply(self, code, body=b"", head=False):
        self.send_response(code)
        if code in (204, 304):
            self.end_headers()
            return
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def do_HEAD(self):
        self.reply(200, b"x" * 100, head=True)

    def do_GET(self):
        p = self.path
        if p.startswith("/delay/"):
            t0 = time.monotonic()
            time.sleep(int(p.split("/")[2]) / 1000.0)
            self.reply(200, b"ok")
            print("served %s %.3f" % (p, (time.monotonic() - t0) * 1000.0), flush=True)
        elif p.startswith("/status/"):
            self.reply(int(p.split("/")[2]), b"status body")
        elif p == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for part in (b"hello ", b"chunked ", b"world"):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
        elif p == "/big":
            self.reply(200, b"b" * (1 << 20))
        else:
            self.reply(404, b"not here")

    def do_POST(self):
        n = 0
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b""):
                        pass
                    break
                n += len(self.rfile.read(size))
                self.rfile.readline()
        else:
            n = len(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
        self.reply(201, str(n).encode())


def main():
    host, port = sys.argv[1], int(sys.argv[2])
    server = http.server.ThreadingHTTPServer((host, port), Handler)
    print("listening", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
