# OTLP/HTTP sink for the tracing-cost run: 200 to every POST, a fixed sampling rule.
# OTLP/HTTP sink: usage: otlp-sink.py PORT SAMPLING_RATE
import sys, http.server
RATE = float(sys.argv[2])
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def _send(self, body):
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers(); self.wfile.write(body)
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0))); self._send(b"")
    def do_GET(self):
        self._send(('{"strategyType":"PROBABILISTIC","probabilisticSampling":{"samplingRate":%s}}' % RATE).encode())
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
