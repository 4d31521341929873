#!/usr/bin/env bash
# Captures real client transcripts as fuzzing seeds.
#
# Starts target/debug/nbdkit (memory 1M) on a private Unix socket, puts a
# small recording proxy in front of it, runs nbdinfo, qemu-img and nbdsh
# through the proxy, and writes what each client sent:
#
#   fuzz/seeds/negotiate/<client>-<n>  the client bytes after the greeting
#                                      (client flags, options, requests)
#   fuzz/seeds/option/<client>-<n>     one option each (16-byte header + payload)
#   fuzz/seeds/request/<client>-<n>    an 11-byte export-state prefix, then
#                                      the transmission-phase bytes
#
# The request prefix is the one fuzz/fuzz_targets/request.rs reads:
#   byte 0: bit 0 extended headers, bit 1 structured replies,
#           bit 2 base:allocation selected
#   bytes 1-2: transmission flags (big endian), bytes 3-10: export size
#
# Usage: fuzz/capture-seeds.sh   (from anywhere; CARGO_TARGET_DIR is honoured)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="/usr/bin:/usr/sbin:/bin:/sbin:$PATH"   # Debian's python3 has libnbd

target=${CARGO_TARGET_DIR:-target}
cargo build --quiet --bin nbdkit
nbdkit="$target/debug/nbdkit"
for p in nbdinfo nbdsh qemu-img /usr/bin/python3; do
  command -v "$p" >/dev/null || { echo "capture-seeds: $p is required" >&2; exit 1; }
done

exec /usr/bin/python3 - "$nbdkit" <<'PY'
import os, socket, struct, subprocess, sys, tempfile, threading, time, hashlib

nbdkit = sys.argv[1]
tmp = tempfile.mkdtemp(prefix="nbdkit-seeds-")
upstream = os.path.join(tmp, "server.sock")
front = os.path.join(tmp, "proxy.sock")
srv = subprocess.Popen([nbdkit, "--foreground", "--unix", upstream, "memory", "1M"],
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
import atexit
atexit.register(srv.kill)
for _ in range(500):
    try:
        socket.socket(socket.AF_UNIX).connect(upstream)
        break
    except OSError:
        time.sleep(0.01)

transcripts = []          # (client, [client bytes], [server bytes])
lock = threading.Lock()
current = ["?"]

def pump(src, dst, buf):
    try:
        while True:
            b = src.recv(65536)
            if not b:
                break
            buf.append(b)
            dst.sendall(b)
    except OSError:
        pass
    for s in (dst,):
        try:
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass

def serve(c):
    u = socket.socket(socket.AF_UNIX)
    u.connect(upstream)
    cbuf, sbuf = [], []
    with lock:
        transcripts.append((current[0], cbuf, sbuf))
    t1 = threading.Thread(target=pump, args=(c, u, cbuf))
    t2 = threading.Thread(target=pump, args=(u, c, sbuf))
    t1.start(); t2.start(); t1.join(); t2.join()
    c.close(); u.close()

lsock = socket.socket(socket.AF_UNIX)
lsock.bind(front)
lsock.listen(16)
def accept_loop():
    while True:
        try:
            c, _ = lsock.accept()
        except OSError:
            return
        threading.Thread(target=serve, args=(c,), daemon=True).start()
threading.Thread(target=accept_loop, daemon=True).start()

uri = "nbd+unix:///?socket=" + front
qemu = "nbd+unix:///?socket=" + front
out_img = os.path.join(tmp, "copy.img")
nbdsh_rw = """
h.pwrite(b"\\x5a" * 512, 4096)
assert h.pread(512, 4096) == b"\\x5a" * 512
h.flush()
if h.can_trim(): h.trim(4096, 65536)
if h.can_zero(): h.zero(8192, 131072)
if h.can_cache(): h.cache(4096, 0)
if h.can_fua(): h.pwrite(b"\\x11" * 512, 0, nbd.CMD_FLAG_FUA)
"""
nbdsh_bs = """
h.block_status(65536, 0, lambda *a: 0)
h.block_status(65536, 0, lambda *a: 0, nbd.CMD_FLAG_REQ_ONE)
h.pread_structured(4096, 0, lambda *a: 0, nbd.CMD_FLAG_DF)
"""
nbdsh_opt = """
h.set_opt_mode(True)
h.connect_uri(URI)
h.opt_list(lambda *a: 0)
h.opt_info()
h.opt_list_meta_context(lambda *a: 0)
h.set_export_name("nonexistent")
try:
    h.opt_info()
except nbd.Error:
    pass
h.set_export_name("")
h.opt_go()
h.pread(512, 0)
"""
nbdsh_abort = """
h.set_opt_mode(True)
h.connect_uri(URI)
h.opt_abort()
"""
clients = [
    ("nbdinfo", ["nbdinfo", uri]),
    ("nbdinfo-list", ["nbdinfo", "--list", uri]),
    ("nbdinfo-map", ["nbdinfo", "--map", uri]),
    ("nbdinfo-size", ["nbdinfo", "--size", uri]),
    ("qemu-img-info", ["qemu-img", "info", qemu]),
    ("qemu-img-map", ["qemu-img", "map", "--output=json", "-f", "raw", qemu]),
    ("qemu-img-convert", ["qemu-img", "convert", "-f", "raw", "-O", "raw", qemu, out_img]),
    ("qemu-io-write", ["qemu-io", "-f", "raw", "-c", "write -P 0x33 0 4k", "-c", "write -z 8k 8k",
                       "-c", "discard 64k 64k", "-c", "flush", "-c", "read -P 0x33 0 4k", qemu]),
    ("nbdsh-rw", ["nbdsh", "-u", uri, "-c", nbdsh_rw]),
    ("nbdsh-simple", ["nbdsh", "-c", "h.set_request_structured_replies(False)", "-c",
                      "h.connect_uri('%s')" % uri, "-c", nbdsh_rw]),
    ("nbdsh-blockstatus", ["nbdsh", "-c", "h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)",
                           "-c", "h.connect_uri('%s')" % uri, "-c", nbdsh_bs]),
    ("nbdsh-opt", ["nbdsh", "-c", "URI = '%s'" % uri, "-c", nbdsh_opt]),
    ("nbdsh-abort", ["nbdsh", "-c", "URI = '%s'" % uri, "-c", nbdsh_abort]),
]
for name, argv in clients:
    if subprocess.run(["sh", "-c", "command -v " + argv[0]], capture_output=True).returncode:
        print("capture-seeds: skipping %s (%s not installed)" % (name, argv[0]))
        continue
    current[0] = name
    r = subprocess.run(argv, capture_output=True, timeout=60)
    if r.returncode:
        sys.exit("capture-seeds: %s failed: %s" % (name, r.stderr.decode(errors="replace")))
    time.sleep(0.2)

# A transcript no modern client produces: an old (non-fixed) client that
# only knows EXPORT_NAME, then reads and disconnects. Sent raw, also
# through the proxy.
current[0] = "raw-export-name"
s = socket.socket(socket.AF_UNIX)
s.connect(front)
s.recv(18, socket.MSG_WAITALL)
s.sendall(struct.pack(">I", 0) + b"IHAVEOPT" + struct.pack(">II", 1, 0))
s.recv(8 + 2 + 124, socket.MSG_WAITALL)
s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 0, 1, 0, 512))
s.recv(16 + 512, socket.MSG_WAITALL)
s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 2, 2, 0, 0))
s.close()
time.sleep(0.3)

lsock.close()
srv.terminate()
srv.wait()

REQ, EXT_REQ = 0x25609513, 0x21E41C71
IHAVEOPT = b"IHAVEOPT"
REP_MAGIC = 0x0003E889045565A9

def split(cl):
    """Client stream -> (options [(opt, bytes)], transmission bytes or None, state)."""
    if len(cl) < 4:
        return [], None, {}
    pos, opts, st = 4, [], {"sr": False, "meta": False, "ext": False}
    while pos + 16 <= len(cl) and cl[pos:pos + 8] == IHAVEOPT:
        opt, ln = struct.unpack(">II", cl[pos + 8:pos + 16])
        opts.append((opt, cl[pos:pos + 16 + ln]))
        st["sr"] |= opt == 8
        st["meta"] |= opt == 10
        st["ext"] |= opt == 11
        pos += 16 + ln
    rest = cl[pos:]
    if len(rest) >= 4 and struct.unpack(">I", rest[:4])[0] in (REQ, EXT_REQ):
        st["ext"] = struct.unpack(">I", rest[:4])[0] == EXT_REQ
        return opts, rest, st
    return opts, None, st

def eflags_of(sv):
    """Transmission flags from the server's NBD_INFO_EXPORT reply."""
    pos = 18
    while pos + 20 <= len(sv):
        magic, opt, typ, ln = struct.unpack(">QIII", sv[pos:pos + 20])
        if magic != REP_MAGIC:
            break
        body = sv[pos + 20:pos + 20 + ln]
        if typ == 3 and len(body) == 12 and body[:2] == b"\0\0":
            return struct.unpack(">H", body[10:12])[0]
        pos += 20 + ln
    if len(sv) >= 18 + 10:       # EXPORT_NAME reply: size, flags
        return struct.unpack(">H", sv[26:28])[0]
    return 1

base = os.path.join(os.getcwd(), "fuzz", "seeds")
seen = set()
def put(kind, name, data):
    h = hashlib.sha1(kind.encode() + data).hexdigest()
    if h in seen or not data:
        return
    seen.add(h)
    d = os.path.join(base, kind)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)

counts = {}
for client, cbuf, sbuf in transcripts:
    cl, sv = b"".join(cbuf), b"".join(sbuf)
    if not cl:
        continue
    n = counts.get(client, 0)
    counts[client] = n + 1
    tag = "%s-%d" % (client, n)
    # Cap the size of a seed: a long transmission phase adds nothing.
    put("negotiate", tag, cl[:16384])
    opts, tx, st = split(cl)
    for i, (opt, b) in enumerate(opts):
        put("option", "%s-%d" % (tag, i), b[:16384])
    if tx is not None:
        flags = (1 if st["ext"] else 0) | (2 if st["sr"] or st["ext"] else 0) | (4 if st["meta"] else 0)
        prefix = bytes([flags]) + struct.pack(">HQ", eflags_of(sv), 1 << 20)
        put("request", tag, prefix + tx[:16384])
for kind in ("negotiate", "option", "request"):
    d = os.path.join(base, kind)
    print("%s: %d seeds" % (d, len(os.listdir(d)) if os.path.isdir(d) else 0))
PY
