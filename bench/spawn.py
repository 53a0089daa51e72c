# Python's side of bench/spawn.lua: start+join of a process that does
# nothing, under the spawn and forkserver start methods.
import multiprocessing as mp

from lib import emit, rate as _rate


def rate(n, f):
    return _rate(n, f, warm=True)   # warmed up: also starts the fork server

def nothing():
    pass

def start_join(ctx):
    def run(n):
        for _ in range(n):
            p = ctx.Process(target=nothing)
            p.start(); p.join(); p.close()
    return run

if __name__ == "__main__":
    # the fork server imports what the main module imports (as bench/spawn.lua
    # preloads bench.lib); '__main__' is Python's default preload
    mp.set_forkserver_preload(["__main__", "lib"])
    emit("spawn_start_join", "python", rate(40, start_join(mp.get_context("spawn"))), "ops/s")
    emit("forkserver_start_join", "python",
         rate(60, start_join(mp.get_context("forkserver"))), "ops/s")
