"""On the PYTHONPATH of the tests' training subprocesses, where Python imports it at start (as sitecustomize),
it changes the file system's behaviour from outside the product, through an audit hook:
  - renaming a directory fails, as on a Cloud Storage FUSE mount without --rename-dir-limit (the usual shared
    storage of a TPU pod); renaming a file still works;
  - CRASH_AT=EVENT:PATH_SUFFIX:N:SIGNAL sends SIGNAL to this process just before the Nth audit event EVENT whose
    path ends with PATH_SUFFIX: "os.rename" (os.replace raises it too; the path is the destination) or "open"
    (counting opens for writing or appending only). E.g. os.rename:step_00000004/process_00000.safetensors:1:
    SIGKILL kills a process in the middle of writing checkpoint 4, and open:metrics.jsonl:2:SIGTERM sends a
    preemption notice while the second progress record of the run is written. Several moments, each counted
    on its own, are separated by commas. SIGSTOP holds the process at that moment (it goes on at SIGCONT):
    a test can then act while, say, a checkpoint is half written;
  - READ_ONLY=PATH makes the directory PATH (and everything below it) read-only, as a read-only mount is:
    opening a file there for writing, creating, removing, renaming, truncating or chmod-ing anything there
    fails with OSError(EROFS, "Read-only file system"); reading works.
(Imported under another name, e.g. `from faults.sitecustomize import files_only`, it hooks nothing.)"""

import errno
import os
import signal
import sys
import threading


def files_only(rename):
    """A rename function that refuses directories, for monkeypatching os.rename and os.replace in a test."""
    def guarded(src, dst, *args, **kwargs):
        if os.path.isdir(src):
            raise OSError(errno.ENOTSUP, "renaming a directory is not supported here", src)
        return rename(src, dst, *args, **kwargs)
    return guarded


def _writes(event, args):
    """The paths (absolute) that the audit event `event` writes to, removes or renames; [] for any other."""
    def absolute(path, dir_fd=None):
        if not isinstance(path, (str, bytes, os.PathLike)):
            return None  # a file descriptor
        path = os.fsdecode(os.fspath(path))
        if isinstance(dir_fd, int) and dir_fd >= 0 and not os.path.isabs(path):  # as shutil.rmtree removes
            path = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
        return os.path.abspath(path)

    if event == "open":
        path, mode, flags = args
        if (mode is None and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND)) or \
                (isinstance(mode, str) and set(mode) & set("wax+")):
            return [absolute(path)]
    elif event in ("os.remove", "os.rmdir"):
        return [absolute(args[0], args[1])]
    elif event in ("os.mkdir", "os.chmod"):
        return [absolute(args[0], args[2])]
    elif event == "os.rename":
        return [absolute(args[0], args[2]), absolute(args[1], args[3])]
    elif event == "os.truncate":
        return [absolute(args[0])]
    return []


def _hook(crashes, read_only):
    seen = [0] * len(crashes)
    read_only = read_only and os.path.abspath(read_only)

    def hook(event, args):
        if event == "os.rename" and os.path.isdir(args[0]):
            raise OSError(errno.ENOTSUP, "renaming a directory is not supported here", args[0])
        if read_only:
            for path in _writes(event, args):
                if path and (path == read_only or path.startswith(read_only + os.sep)):
                    raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
        for i, crash in enumerate(crashes):
            if event == crash[0] and (event != "open" or set(str(args[1])) & set("wax+")):
                path = args[1] if event == "os.rename" else args[0]
                if isinstance(path, (str, os.PathLike)) and os.fspath(path).endswith(crash[1]):
                    seen[i] += 1
                    if seen[i] == int(crash[2]) and crash[3] == "SIGSTOP":  # this thread stops before it goes on
                        signal.pthread_kill(threading.get_ident(), signal.SIGSTOP)
                    elif seen[i] == int(crash[2]):
                        os.kill(os.getpid(), signal.Signals[crash[3]])
    return hook


if __name__ == "sitecustomize":
    specs = os.environ.get("CRASH_AT", "")
    sys.addaudithook(_hook([s.split(":") for s in specs.split(",") if s], os.environ.get("READ_ONLY", "")))
