# The cluster case's other side (bench/run.lua protocol): RQ (SimpleWorker)
# and, when it runs here, Celery (prefork, started as python3 -m celery),
# each on a redis-server of its own started as bench/cluster.lua starts
# ours: 10,000 trivial tasks with two workers, and one task's round trip.
import os
import sys

try:
    import redis
    import rq
except ImportError:
    # Debian's python3-rq is for Debian's python3; another python3 first
    # on PATH does not see it
    if sys.executable != "/usr/bin/python3" and os.path.exists("/usr/bin/python3"):
        os.execv("/usr/bin/python3", ["/usr/bin/python3"] + sys.argv)
    print("# cluster: python3-rq not installed; skipped")
    sys.exit(0)

try:
    from celery import Celery
except ImportError:
    Celery = None

SOCK = os.environ.get("BENCH_REDIS_SOCK")


def trivial(x):
    return x


if Celery is not None and SOCK:
    app = Celery("cluster", broker="redis+socket://" + SOCK,
                 backend="redis+socket://" + SOCK)
    app.conf.update(worker_prefetch_multiplier=4, task_acks_late=False,
                    broker_connection_retry_on_startup=True)
    celery_trivial = app.task(name="trivial")(trivial)


def main():
    import shutil
    import subprocess
    import tempfile
    import time

    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, here)
    from lib import emit

    d = tempfile.mkdtemp()
    sock = d + "/s"
    subprocess.run(["redis-server", "--port", "0", "--unixsocket", sock, "--dir", d,
                    "--save", "", "--appendonly", "no", "--daemonize", "yes",
                    "--pidfile", d + "/pid", "--logfile", d + "/log"], check=True)
    r = redis.Redis(unix_socket_path=sock)
    for _ in range(200):
        try:
            r.ping()
            break
        except redis.exceptions.ConnectionError:
            time.sleep(0.02)
    env = dict(os.environ, BENCH_REDIS_SOCK=sock, PYTHONPATH=here)
    procs = []
    N, M = 10000, 200
    try:
        # RQ: two SimpleWorkers (no fork per job), the fastest RQ worker
        q = rq.Queue("bench", connection=r)
        for _ in range(2):
            procs.append(subprocess.Popen(
                [sys.executable, "-c",
                 "import sys, redis, rq; sys.path.insert(0, %r); import cluster; "
                 "rq.SimpleWorker([rq.Queue('bench', connection=redis.Redis(unix_socket_path=%r))], "
                 "connection=redis.Redis(unix_socket_path=%r)).work()" % (here, sock, sock)],
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        from cluster import trivial as t  # importable by name in the workers
        job = q.enqueue(t, 1)
        while job.get_status() != "finished":
            time.sleep(0.01)
        t0 = time.perf_counter()
        jobs = q.enqueue_many([rq.Queue.prepare_data(t, (i,)) for i in range(N)])
        last = jobs[-1]
        while last.get_status() != "finished" or q.count > 0 or \
                rq.registry.StartedJobRegistry(queue=q).count > 0:
            time.sleep(0.005)
        emit("cluster_10k_2workers", "rq", N / (time.perf_counter() - t0), "tasks/s")
        t0 = time.perf_counter()
        for i in range(M):
            job = q.enqueue(t, i)
            while job.get_status(refresh=True) != "finished":
                time.sleep(0.0002)
            assert job.result == i
        emit("cluster_rtt", "rq", M / (time.perf_counter() - t0), "ops/s")
        for p in procs:
            p.kill()
            p.wait()
        procs = []
        r.flushall()

        if Celery is not None:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "cluster", "worker", "--pool", "prefork",
                 "-c", "2", "--loglevel", "ERROR", "--without-gossip", "--without-mingle",
                 "--without-heartbeat"],
                env=env, cwd=here, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            os.environ["BENCH_REDIS_SOCK"] = sock
            import importlib
            import cluster
            importlib.reload(cluster)
            task = cluster.celery_trivial
            task.delay(1).get(timeout=60)
            t0 = time.perf_counter()
            res = [task.delay(i) for i in range(N)]
            for x in res:
                x.get(timeout=120)
            emit("cluster_10k_2workers", "celery", N / (time.perf_counter() - t0), "tasks/s")
            t0 = time.perf_counter()
            for i in range(M):
                assert task.delay(i).get(timeout=60) == i
            emit("cluster_rtt", "celery", M / (time.perf_counter() - t0), "ops/s")
            del res, x
            import gc
            gc.collect()
    finally:
        for p in procs:
            p.kill()
            p.wait()
        try:
            r.shutdown(nosave=True)
        except Exception:
            pass
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
