# The bench files' side of bench/run.lua's protocol (from lib import ...;
# bench/ is the script's directory, so it is on the path).
import time


def emit(case, impl, r, unit):
    """One result line: case<TAB>impl<TAB>rate<TAB>unit (higher is better)."""
    print(f"{case}\t{impl}\t{r:.1f}\t{unit}", flush=True)


def rate(n, f, warm=False):
    """Rate of f(n) doing n operations, after an unmeasured n/10 if warm."""
    if warm:
        f(max(1, n // 10))
    t0 = time.perf_counter()
    f(n)
    return n / (time.perf_counter() - t0)
