"""On the PYTHONPATH of the tests' training subprocesses, where Python imports it at start (as sitecustomize),
it changes the file system's behaviour from outside the product, through an audit hook:
  - renaming a directory fails, as on a Cloud Storage FUSE mount without --rename-dir-limit (the usual shared
    storage of a TPU pod); renaming a file still works;
  - CRASH_AT=EVENT:PATH_SUFFIX:N:SIGNAL sends SIGNAL to this process just before the Nth audit event EVENT whose
    path ends with PATH_SUFFIX: "os.rename" (os.replace raises it too; the path is the destination) or "open"
    (counting opens for writing or appending only). E.g. os.rename:step_00000004/process_00000.safetensors:1:
    SIGKILL kills a process in the middle of writing checkpoint 4, and open:metrics.jsonl:2:SIGTERM sends a
    preemption notice while the second progress record of the run is written.
(Imported under another name, e.g. `from faults.sitecustomize import files_only`, it hooks nothing.)"""

import errno
import os
import signal
import sys


def files_only(rename):
    """A rename function that refuses directories, for monkeypatching os.rename and os.replace in a test."""
    def guarded(src, dst, *args, **kwargs):
        if os.path.isdir(src):
            raise OSError(errno.ENOTSUP, "renaming a directory is not supported here", src)
        return rename(src, dst, *args, **kwargs)
    return guarded


def _hook(crash):
    seen = [0]

    def hook(event, args):
        if event == "os.rename" and os.path.isdir(args[0]):
            raise OSError(errno.ENOTSUP, "renaming a directory is not supported here", args[0])
        if crash and event == crash[0] and (event != "open" or set(str(args[1])) & set("wax+")):
            path = args[1] if event == "os.rename" else args[0]
            if isinstance(path, (str, os.PathLike)) and os.fspath(path).endswith(crash[1]):
                seen[0] += 1
                if seen[0] == int(crash[2]):
                    os.kill(os.getpid(), signal.Signals[crash[3]])
    return hook


if __name__ == "sitecustomize":
    spec = os.environ.get("CRASH_AT", "")
    sys.addaudithook(_hook(spec.split(":") if spec else None))
