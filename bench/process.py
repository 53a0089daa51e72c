# Python's side of bench/process.lua: the same cases with multiprocessing (fork).
import multiprocessing as mp

from lib import emit, rate

def nothing():
    pass

def echo(c, raw):
    recv, send = (c.recv_bytes, c.send_bytes) if raw else (c.recv, c.send)
    while True:
        v = recv()
        if v == b"stop" or v == "stop":
            break
        send(v)

def start_join(n):
    for _ in range(n):
        p = mp.Process(target=nothing)
        p.start(); p.join(); p.close()

def with_echo(raw, f):
    a, b = mp.Pipe()
    p = mp.Process(target=echo, args=(b, raw))
    p.start()
    f(a)
    if raw:
        a.send_bytes(b"stop")
    else:
        a.send("stop")
    p.join()
    a.close(); b.close()

if __name__ == "__main__":
    mp.set_start_method("fork")
    emit("fork_start_join", "python", rate(300, start_join), "ops/s")

    def small(a):
        def rtt(n):
            for i in range(n):
                a.send(i); a.recv()
        emit("pipe_rtt_small", "python", rate(20000, rtt), "ops/s")
    with_echo(False, small)

    def big(a):
        mib = b"x" * (1 << 20)
        def run(n):
            for _ in range(n):
                a.send_bytes(mib); a.recv_bytes()
        emit("pipe_1mib", "python", rate(300, run) * 2, "MiB/s")
    with_echo(True, big)
