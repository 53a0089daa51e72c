# Python's side of bench/spawn.lua: start+join of a process that does
# nothing, under the spawn and forkserver start methods.
import multiprocessing as mp
import time

def rate(n, f):
    f(max(1, n // 10))      # warm up (and start the fork server)
    t0 = time.perf_counter()
    f(n)
    return n / (time.perf_counter() - t0)

def emit(case, impl, r, unit):
    print(f"{case}\t{impl}\t{r:.1f}\t{unit}", flush=True)

def nothing():
    pass

def start_join(ctx):
    def run(n):
        for _ in range(n):
            p = ctx.Process(target=nothing)
            p.start(); p.join(); p.close()
    return run

if __name__ == "__main__":
    emit("spawn_start_join", "python", rate(40, start_join(mp.get_context("spawn"))), "ops/s")
    emit("forkserver_start_join", "python",
         rate(60, start_join(mp.get_context("forkserver"))), "ops/s")
