# Python's side of bench/pool.lua (bench/run.lua protocol): the same cases,
# each cold (first run on a fresh pool) and steady (median of the next 5),
# under the fork start method.
import multiprocessing as mp
import statistics
import time


def sq(x):
    return x * x


from lib import emit as _emit

STEADY = 5


def emit(case, r, unit="ops/s"):
    _emit(case, "python", r, unit)


def cold_steady(case, run):
    with mp.Pool(2) as pool:
        pool.map(sq, [1, 2, 3, 4])
        t0 = time.perf_counter()
        n = run(pool)
        emit(case + "_cold", n / (time.perf_counter() - t0))
        rates = []
        for _ in range(STEADY):
            t0 = time.perf_counter()
            n = run(pool)
            rates.append(n / (time.perf_counter() - t0))
        emit(case + "_steady", statistics.median(rates))


def map_default(pool):
    r = pool.map(sq, BIG)
    assert r[-1] == len(BIG) ** 2
    return len(BIG)


def map_chunk1(pool):
    r = pool.map(sq, SMALL, 1)
    assert r[776] == 777 * 777
    return len(SMALL)


def imap_chunk1(pool):
    n = len(SMALL)
    assert sum(pool.imap(sq, SMALL, 1)) == n * (n + 1) * (2 * n + 1) // 6
    return n


def apply_rtt(pool):
    M = 1000
    for i in range(M):
        assert pool.apply_async(sq, (i,)).get() == i * i
    return M


BIG = list(range(1, 100001))
SMALL = list(range(1, 20001))

if __name__ == "__main__":
    mp.set_start_method("fork")
    K = 40
    t0 = time.perf_counter()
    for _ in range(K):
        p = mp.Pool(2)
        p.close()
        p.join()
    emit("start_close_join", K / (time.perf_counter() - t0))
    cold_steady("map_default", map_default)
    cold_steady("map_chunk1", map_chunk1)
    cold_steady("imap_chunk1", imap_chunk1)
    cold_steady("apply_rtt", apply_rtt)
