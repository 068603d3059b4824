#!/usr/bin/env python3
"""List a guest's tasks and read a kernel symbol's bytes through hvpatchd.

Standard library only: HTTP/JSON over hvpatchd's unix socket with
http.client. The API is described in docs/openapi.json (hvpatchd also
serves it at /openapi.json).

    python3 hvpatch_api.py DOMAIN [SYMBOL [LENGTH]]
    python3 hvpatch_api.py --socket /run/hvpatch/hvpatchd.sock web-1 version_proc_show 32

The socket is --socket, else $HVPATCH_DAEMON_SOCKET, else
/run/hvpatch/hvpatchd.sock; reaching it takes the socket's permissions
(root or the group of api.group).
"""

import argparse
import http.client
import json
import os
import socket
import sys
import urllib.parse

DEFAULT_SOCKET = "/run/hvpatch/hvpatchd.sock"


class UnixHTTPConnection(http.client.HTTPConnection):
    """An HTTPConnection to a unix socket (the host name is only a label)."""

    def __init__(self, path, timeout=300):
        super().__init__("hvpatchd", timeout=timeout)
        self.path = path

    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self.path)
        self.sock = s


class APIError(Exception):
    """A failed request: hvpatchd's status and its {"error": ...} message."""

    def __init__(self, status, message):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


class Client:
    def __init__(self, path=None):
        self.path = path or os.environ.get("HVPATCH_DAEMON_SOCKET") or DEFAULT_SOCKET

    def request(self, method, path, query=None, body=None):
        if query:
            path += "?" + urllib.parse.urlencode(query, doseq=True)
        conn = UnixHTTPConnection(self.path)
        try:
            headers = {}
            data = None
            if body is not None:
                data = json.dumps(body).encode()
                headers["Content-Type"] = "application/json"
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        finally:
            conn.close()
        if resp.status != 200:
            try:
                message = json.loads(raw)["error"]
            except (ValueError, KeyError, TypeError):
                message = raw.decode(errors="replace").strip()
            raise APIError(resp.status, message)
        return json.loads(raw)

    def get(self, path, **query):
        return self.request("GET", "/v1" + path, query)

    def domain(self, name, what, **query):
        return self.get(f"/domains/{urllib.parse.quote(name, safe='')}/{what}", **query)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--socket", help="hvpatchd's API socket")
    ap.add_argument("domain", help="libvirt domain name or UUID")
    ap.add_argument("symbol", nargs="?", default="version_proc_show", help="symbol (or SYMBOL+OFF, or 0xADDR) to read")
    ap.add_argument("length", nargs="?", default="16", help="bytes to read")
    args = ap.parse_args(argv)
    api = Client(args.socket)

    try:
        tasks = api.domain(args.domain, "ps")
        print(f"{'PID':>7} {'PPID':>7} ST COMM")
        for t in sorted(tasks, key=lambda t: (t["pid"], t["comm"])):
            print(f"{t['pid']:>7} {t['ppid']:>7} {t['state']:<2} {t['comm']}")

        # Addresses are strings ("0xffffffff81234560"): 64-bit values
        # survive any JSON parser that way.
        sym = api.domain(args.domain, "sym", q=args.symbol)["symbols"]
        read = api.domain(args.domain, "read", target=args.symbol, len=args.length)["bytes"]
    except APIError as e:
        print(f"hvpatch_api.py: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"hvpatch_api.py: {api.path}: {e}", file=sys.stderr)
        return 1

    data = bytes.fromhex(read["hex"])
    where = f" [{sym[0]['module']}]" if sym and sym[0].get("module") else ""
    print(f"\n{args.symbol}{where} at {read['addr']}, {len(data)} bytes:")
    addr = int(read["addr"], 16)
    for off in range(0, len(data), 16):
        row = data[off:off + 16]
        print(f"{addr + off:016x}  {row.hex(' ')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
