# Python's side of bench/manager.lua: the same cases with
# multiprocessing.Manager() (fork).
import multiprocessing as mp
import time

from lib import emit as _emit


def emit(case, r, unit):
    _emit(case, "python", r, unit)


def dict_roundtrip(m, n):
    d = m.dict()
    for i in range(n // 10):
        d["key"] = i
        d["key"]
    t0 = time.monotonic()
    for i in range(n):
        d["key"] = i
        d["key"]
    return n / (time.monotonic() - t0)


PROCS, EACH = 4, 2000


def worker(d, lock, go):
    go.wait(30)
    for _ in range(EACH):
        with lock:
            d["n"] += 1


def incr(m):
    d, lock, go = m.dict(), m.Lock(), m.Event()
    d["n"] = 0
    ps = [mp.Process(target=worker, args=(d, lock, go)) for _ in range(PROCS)]
    for p in ps:
        p.start()
    t0 = time.monotonic()
    go.set()
    for p in ps:
        p.join(120)
    dt = time.monotonic() - t0
    return d["n"], PROCS * EACH / dt


def echo(a, b, n):
    for _ in range(n):
        b.put(a.get(timeout=30))


def queue_roundtrip(m, n):
    a, b = m.Queue(), m.Queue()
    p = mp.Process(target=echo, args=(a, b, n + 1))
    p.start()
    a.put(0)
    b.get(timeout=30)
    t0 = time.monotonic()
    for i in range(n):
        a.put(i)
        b.get(timeout=30)
    dt = time.monotonic() - t0
    p.join(30)
    return n / dt


if __name__ == "__main__":
    mp.set_start_method("fork")
    with mp.Manager() as m:
        emit("manager_dict_setget", dict_roundtrip(m, 5000), "pairs/s")
        total, rate = incr(m)
        emit("manager_incr_4x2000", rate, "incr/s")
        print("# manager_incr_4x2000: python total %d (expected %d)%s"
              % (total, PROCS * EACH, "" if total == PROCS * EACH else " WRONG"), flush=True)
        emit("manager_queue_rt", queue_roundtrip(m, 3000), "rt/s")
