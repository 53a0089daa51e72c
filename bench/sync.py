# Python's side of bench/sync.lua: the same cases with multiprocessing (fork).
import multiprocessing as mp
import time


from lib import emit as _emit


def emit(case, r, unit):
    _emit(case, "python", r, unit)


def median3(f):
    return sorted([f(), f(), f()])[1]


def pairs_rate(obj, n):
    def trial():
        t0 = time.perf_counter()
        for _ in range(n):
            obj.acquire()
            obj.release()
        return n / (time.perf_counter() - t0)
    return median3(trial)


N = 100000


def work(v):
    for _ in range(N):
        with v.get_lock():
            v.value += 1


def value_trial(v):
    v.value = 0
    t0 = time.perf_counter()
    p = mp.Process(target=work, args=(v,))
    p.start()
    work(v)
    p.join()
    dt = time.perf_counter() - t0
    assert v.value == 2 * N
    return 2 * N / dt


if __name__ == "__main__":
    mp.set_start_method("fork")
    emit("lock_uncontended", pairs_rate(mp.Lock(), 1000000), "ops/s")
    emit("rlock_uncontended", pairs_rate(mp.RLock(), 1000000), "ops/s")
    emit("sem_uncontended", pairs_rate(mp.Semaphore(1), 1000000), "ops/s")
    v = mp.Value("i", 0)
    emit("value_2procs", median3(lambda: value_trial(v)), "ops/s")
