# Python's side of bench/pool.lua (bench/run.lua protocol): Pool.map of
# 100,000 trivial tasks at the default chunksize and at chunksize 1,
# apply_async(...).get() round trips, and Pool(2) start + close + join,
# under the fork start method.
import multiprocessing as mp
import time


def sq(x):
    return x * x


from lib import emit as _emit


def emit(case, r, unit="ops/s"):
    _emit(case, "python", r, unit)


if __name__ == "__main__":
    mp.set_start_method("fork")
    K = 40
    t0 = time.perf_counter()
    for _ in range(K):
        p = mp.Pool(2)
        p.close()
        p.join()
    emit("start_close_join", K / (time.perf_counter() - t0))

    N = 100000
    xs = list(range(1, N + 1))
    with mp.Pool(2) as pool:
        pool.map(sq, [1, 2, 3, 4])
        t0 = time.perf_counter()
        r = pool.map(sq, xs)
        emit("map_100k_default", N / (time.perf_counter() - t0))
        assert r[-1] == N * N
        t0 = time.perf_counter()
        r = pool.map(sq, xs, 1)
        emit("map_100k_chunk1", N / (time.perf_counter() - t0))
        assert r[776] == 777 * 777
        M = 2000
        t0 = time.perf_counter()
        for i in range(M):
            assert pool.apply_async(sq, (i,)).get() == i * i
        emit("apply_async_rtt", M / (time.perf_counter() - t0))
