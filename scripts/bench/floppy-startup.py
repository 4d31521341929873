#!/usr/bin/python3
"""Start-up of an NBD server, measured finely (for scripts/bench/floppy).

Usage:
  floppy-startup.py --unix SOCK [--server-cpus LIST] [--client-cpus LIST]
                    [-n N] -- CMD ARGS...

Starts CMD N times, one after the other. Each time: the server is spawned
(posix_spawn) pinned to --server-cpus (the affinity is inherited, no
taskset exec in between); this process then moves to --client-cpus and
tries connect() on SOCK in a tight loop, without sleeping (one attempt
takes a few microseconds, so the resolution is far below a millisecond,
where the kit's launch.py polls every 0.2 ms plus Python's sleep
overshoot), reads the 8-byte NBD greeting, then reads the server's CPU
time so far (the sum of /proc/PID/task/*/schedstat: nanoseconds, every
live thread), sends SIGTERM and reaps it (wait4 gives the CPU of its
whole life, dead threads included).

Prints one line per start:
  ACCEPT_MS GREETING_MS READY_CPU_MS LIFE_CPU_MS
ACCEPT_MS: spawn to the first successful connect() (the socket listens);
GREETING_MS: spawn to the greeting's last byte (the server accepted and
answered: the figure to compare); READY_CPU_MS: the server's CPU until
then; LIFE_CPU_MS: its CPU from spawn to exit (includes work it left to
threads after start-up, e.g. opening files in the background, as far as
it got, and its shutdown).
"""
import argparse
import os
import signal
import socket
import sys
import time


def cpus(spec):
    out = set()
    for part in spec.split(","):
        if "-" in part:
            a, b = part.split("-")
            out.update(range(int(a), int(b) + 1))
        elif part:
            out.add(int(part))
    return out


def schedstat_ns(pid):
    total = 0
    try:
        tids = os.listdir("/proc/%d/task" % pid)
    except OSError:
        return 0
    for t in tids:
        try:
            with open("/proc/%d/task/%s/schedstat" % (pid, t)) as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total


# The server's stdio: /dev/null (nbdkit logs every probe that hangs up).
QUIET = [(os.POSIX_SPAWN_OPEN, fd, os.devnull, os.O_RDWR, 0) for fd in (0, 1, 2)]


def one(cmd, sock, srv, cli, timeout):
    if os.path.lexists(sock):
        os.unlink(sock)
    if srv:
        os.sched_setaffinity(0, srv)
    t0 = time.perf_counter()
    pid = os.posix_spawnp(cmd[0], cmd, os.environ, file_actions=QUIET)
    if cli:
        os.sched_setaffinity(0, cli)
    deadline = t0 + timeout
    n = 0
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(sock)
            t_acc = time.perf_counter()
            break
        except OSError:
            s.close()
        os.sched_yield()  # gives the core away only if the server shares it
        n += 1
        if n % 256 == 0:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                sys.exit("floppy-startup.py: server exited before accepting: %s" % " ".join(cmd))
            if time.perf_counter() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                sys.exit("floppy-startup.py: server not ready after %.0f s" % timeout)
    buf = b""
    s.settimeout(timeout)
    while len(buf) < 8:
        chunk = s.recv(8 - len(buf))
        if not chunk:
            break
        buf += chunk
    t_greet = time.perf_counter()
    ready_ns = schedstat_ns(pid)
    s.close()
    if buf[:8] != b"NBDMAGIC":
        print("floppy-startup.py: warning: greeting was %r" % buf, file=sys.stderr)
    os.kill(pid, signal.SIGTERM)
    _, _, ru = os.wait4(pid, 0)
    life = (ru.ru_utime + ru.ru_stime) * 1e3
    return (t_acc - t0) * 1e3, (t_greet - t0) * 1e3, ready_ns / 1e6, life


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--unix", required=True)
    ap.add_argument("--server-cpus", default="")
    ap.add_argument("--client-cpus", default="")
    ap.add_argument("-n", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    cmd = a.cmd[1:] if a.cmd and a.cmd[0] == "--" else a.cmd
    if not cmd:
        ap.error("no command")
    srv, cli = cpus(a.server_cpus), cpus(a.client_cpus)
    for _ in range(a.n):
        r = one(cmd, a.unix, srv, cli, a.timeout)
        print("%.3f %.3f %.3f %.3f" % r, flush=True)


if __name__ == "__main__":
    main()
