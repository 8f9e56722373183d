"""Run a script or module with muon_ds activated, for a source checkout without ``pip install``.

    python examples/with_muon_ds.py path/to/train.py ARGS...
    torchrun --nproc_per_node 2 examples/with_muon_ds.py -m examples.hf_trainer.train ARGS...
    deepspeed --num_gpus 2 examples/with_muon_ds.py -m examples.hf_trainer.train ARGS...

An installed muon-ds needs none of this: its autoload hook activates it whenever DeepSpeed is
imported (``MUON_DS_AUTOLOAD=0`` turns that off).
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    args = sys.argv[1:]
    # The deepspeed launcher puts --local_rank=N right after the script: hand it on to the real one.
    launcher_args: list[str] = []
    while args and args[0].startswith("--local_rank="):
        launcher_args.append(args.pop(0))
    if not args or args[0] == "-m" and len(args) < 2:
        raise SystemExit(__doc__)
    # Python put examples/ first on the path; its deepspeed/ folder would shadow DeepSpeed itself.
    sys.path[0] = str(REPO)
    import muon_ds  # noqa: F401
    import deepspeed  # noqa: F401  (patched by muon_ds as it loads, before the script can look it up)

    if args[0] == "-m":
        sys.argv = [args[1], *args[2:], *launcher_args]
        runpy.run_module(args[1], run_name="__main__", alter_sys=True)
    else:
        script = Path(args[0])
        if not script.is_file():
            raise SystemExit(f"error: script {script} not found")
        sys.argv = [*args, *launcher_args]
        sys.path[0:0] = [str(script.resolve().parent)]
        runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()
