"""wait_until: the one way a test waits for something to become true.

Tests used to write their own loops ("for _ in range(200): ...
time.sleep(0.025)", a monotonic deadline and a bare assert); each picked
its own interval and most failed without saying what they waited for.
wait_until polls PREDICATE until it returns a true value (which it
returns), and on timeout raises an AssertionError naming WHAT, so a
failure reads "timed out after 10 s waiting for strata-nbd to listen on
.../s.sock".  A predicate may itself raise (e.g. AssertionError when the
process it waits for has exited): that ends the wait at once.  WHAT may
be a callable, called only on timeout, to name what was seen by then.
"""
import time


def wait_until(predicate, timeout=10.0, interval=0.02, what="a condition"):
    """Call PREDICATE every INTERVAL seconds until it returns a true
    value; return that value.  After TIMEOUT seconds raise an
    AssertionError that names WHAT (and the last value seen)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            if callable(what):
                what = what()
            raise AssertionError(f"timed out after {timeout:g} s waiting "
                                 f"for {what} (last: {value!r})")
        time.sleep(interval)
