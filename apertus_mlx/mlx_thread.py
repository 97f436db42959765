"""How a thread that ran MLX must end, so that the process does not abort when Python exits.

MLX keeps per-thread state in C++ `thread_local`s: the thread's default streams and their CPU command
encoders, its `mx.compile` cache and, in the Python bindings, its `mx.random` key. The compile cache's
entries (the Python output structure of each compiled function, e.g. the model's xIELU and mlx-lm's
samplers) and the random key (a Python list) hold Python objects, so their destructors take the GIL
(`PyGILState_Ensure`).

C++ runs those destructors only after the thread's Python function has returned: glibc calls them from
`start_thread` (`__call_tls_dtors`) as the OS thread exits. `Thread.join()` has returned by then, because
CPython releases the join lock when it deletes the thread's Python state, before the OS thread exits.
So the main thread may already be finalizing the interpreter when the destructors ask for the GIL;
CPython answers such a late request by `pthread_exit()`-ing the caller, the forced unwind crosses the
`noexcept` destructor, and `std::terminate` aborts the whole process: "terminate called without an
active exception", exit status 134 (-6 to a parent). Joining is therefore not enough; about one run in
three of a plain `Engine` -> `stream` -> `close` -> exit died this way.

`release_thread_state()` empties that state while the thread still holds a live Python thread state,
so the destructors left for thread exit are trivial. (Neither `mx.synchronize()` nor `gc.collect()` alone
does: the compile cache and the random key are not garbage, they are thread-local.)

A thread still inside MLX when finalization begins dies the same way as soon as it takes the GIL back
(`mx.eval` re-acquires it in a `noexcept` destructor), so the thread must also be stopped and joined
before the interpreter finalizes: `Engine` closes itself at exit (an `atexit` hook, which runs before
finalization), and the CLI closes it on every path, Ctrl-C included.

MLX upstream is fixing the destructors themselves (deferring the Python decrefs instead of taking the
GIL); until a release has that, every long-lived MLX thread must end with `release_thread_state()`.
"""

from __future__ import annotations

import mlx.core as mx


def release_thread_state() -> None:
    """Call last on a thread that ran MLX work (not on the main thread), while it can still run Python.

    Waits for the thread's queued work, then drops its streams, compile cache and random key
    (`mx.clear_streams()`): MLX work on this thread afterwards would need new streams.
    """
    try:
        mx.synchronize()  # nothing queued may still use the encoders' temporaries that are dropped next
    finally:
        mx.clear_streams()
