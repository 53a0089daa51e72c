# Codec benchmarks, Python's side (bench/run.lua protocol): pickle round
# trips of the same record and float array as bench/codec.lua. Rates are
# per second of CPU time (time.process_time), as in bench/codec.lua.
import os
import pickle
import time

def rate(f, secs):
    n, batch, t0 = 0, 1, time.process_time()
    while True:
        for _ in range(batch):
            f()
        n += batch
        if batch < 1024:
            batch *= 2
        if time.process_time() - t0 >= secs:
            return n / (time.process_time() - t0)

def make_record():
    r = {"id": 123456, "name": "benchmark record", "active": True}
    for i in range(1, 31):
        r["int_%d" % i] = i * 1000 + i
    for i in range(1, 31):
        r["float_%d" % i] = i / 3 + 0.125
    for i in range(1, 31):
        r["str_%d" % i] = "value-%d" % i
    r["list"] = [i * 1.5 if i % 2 == 0 else i for i in range(1, 51)]
    r["nested"] = {"x": 1.25, "y": -2.5, "label": "point"}
    return r

secs = float(os.environ.get("BENCH_SECONDS", "1.5"))
dumps, loads = pickle.dumps, pickle.loads
proto = pickle.HIGHEST_PROTOCOL
record = make_record()
print("record\tpython\t%.1f\tops/s" % rate(lambda: loads(dumps(record, proto)), secs))
floats = [(i * 7919 % 10007) / 7 - 500.25 for i in range(1, 10001)]
print("floats10k\tpython\t%.1f\tops/s" % rate(lambda: loads(dumps(floats, proto)), secs))
print("# pickle exact: %s" % ("yes" if loads(dumps(record, proto)) == record else "no"))
