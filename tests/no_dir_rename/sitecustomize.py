"""Put on PYTHONPATH of the tests' training subprocesses: renaming a directory fails, as on a Cloud Storage
FUSE mount without --rename-dir-limit (the usual shared storage of a TPU pod). Renaming a file still works.
(Imported under another name, e.g. `from no_dir_rename.sitecustomize import files_only`, it patches nothing.)"""

import errno
import os
import shutil


def files_only(rename):
    def guarded(src, dst, *args, **kwargs):
        if os.path.isdir(src):
            raise OSError(errno.ENOTSUP, "renaming a directory is not supported here", src)
        return rename(src, dst, *args, **kwargs)
    return guarded


if __name__ == "sitecustomize":
    os.rename, os.replace, os.renames = files_only(os.rename), files_only(os.replace), files_only(os.renames)
    shutil.move = files_only(shutil.move)
