"""strata's integration-test harness: one package every test module
imports from (no test module imports another).

- env:     TOP/BUILD, binary()/need()/run(), output helpers (qemu-io
           timing lines, progress bars, a pty), build_libstrata_program.
- wait:    wait_until(predicate, timeout, interval, what), the one poll.
- procs:   spawn()/stop()/kill() by PID, reap() of what a test left
           running (conftest.py's autouse fixture), wait_for_path,
           connect_unix, free_port, Server (a listening NBD server).
- qmp:     the QMP client.
- daemons: stratad/qemu-storage-daemon (Daemon, Monitor, start_qmp),
           strata-nbd (StrataNbd), libnbd handles.
- qcow2:   qemu-img/qemu-io/strata-io runs, the guest Model, header
           access.
- chains:  backing chains built with qemu-img/qemu-io, map_of.
- crash:   the crash shim and its environment.

The names most modules need are re-exported here.
"""
from .env import (BUILD, HERE, TOP, assert_progress_bar,  # noqa: F401
                  binary, build_libstrata_program, drop_qemu_progress,
                  drop_timing, file_state, io_cmds, make_image, need, run,
                  run_on_pty)
from .procs import (Server, alive, connect_unix, free_port,  # noqa: F401
                    spawn, stop, wait_for_path)
from .qmp import QMP, QMPError  # noqa: F401
from .wait import wait_until  # noqa: F401
