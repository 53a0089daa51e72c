# bench/queues.py: Python's multiprocessing.Queue on the cases of
# bench/queues.lua (fork start method). Prints <case>\t<impl>\t<value>\t<unit>.
# (Not named queue.py: that would shadow the standard module multiprocessing uses.)
import multiprocessing as mp
import time


def producer(q, item, n):
    for _ in range(n):
        q.put(item)


def stream(item, n):
    q = mp.Queue()
    t0 = time.monotonic()
    p = mp.Process(target=producer, args=(q, item, n))
    p.start()
    for _ in range(n):
        q.get(timeout=30)
    dt = time.monotonic() - t0
    p.join(30)
    return dt


def echo(a, b, n):
    for _ in range(n):
        b.put(a.get(timeout=30))


def pingpong(n):
    a, b = mp.Queue(), mp.Queue()
    p = mp.Process(target=echo, args=(a, b, n))
    p.start()
    a.put(0)
    b.get(timeout=30)
    t0 = time.monotonic()
    for i in range(2, n + 1):
        a.put(i)
        b.get(timeout=30)
    dt = time.monotonic() - t0
    p.join(30)
    return (n - 1) / dt


def out(case, value, unit):
    print("%s\tpython\t%.1f\t%s" % (case, value, unit), flush=True)


if __name__ == "__main__":
    mp.set_start_method("fork")
    n = 200000
    stream(0, 5000)  # warm up (not measured)
    out("queue_small_int", n / stream(12345, n), "ops/s")
    out("queue_small_str", n / stream("hello, world", n), "ops/s")
    m = 300
    out("queue_1mib", m / stream(b"x" * (1 << 20), m), "MiB/s")
    out("queue_pingpong", pingpong(20000), "ops/s")
