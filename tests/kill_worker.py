"""Test driver: the launcher, killed (``os._exit``, like SIGKILL: nothing is cleaned up) at a
chosen point of the separation heads' checkpointing in a chosen epoch.

    python tests/kill_worker.py {heads_mid_write,after_heads} EPOCH <launcher flags>

* ``heads_mid_write``: half of the heads file's temporary copy is on disk;
* ``after_heads``: the heads file of EPOCH is in place, open_clip has not saved EPOCH yet.
"""
import os
import sys

from openclip_structure.integration import checkpoints


def main():
    point, epoch, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    write, save = checkpoints.write_atomically, checkpoints.save_heads

    def write_half_then_die(obj, path):
        if path.endswith(os.path.basename(checkpoints.heads_path('', epoch))):
            import io

            import torch

            buf = io.BytesIO()
            torch.save(obj, buf)
            with open(f"{path}.tmp{os.getpid()}", "wb") as f:
                f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            os._exit(9)
        return write(obj, path)

    def save_then_die(run, n):
        out = save(run, n)
        if n == epoch:
            os._exit(9)
        return out

    if point == "heads_mid_write":
        checkpoints.write_atomically = write_half_then_die
    elif point == "after_heads":
        checkpoints.save_heads = save_then_die
    else:
        raise SystemExit(f"unknown kill point {point!r}")
    from openclip_structure.main import main as launcher_main

    launcher_main(argv)


if __name__ == "__main__":
    main()
