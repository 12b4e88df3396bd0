"""A machine that is busy: `rnngen train` alone, and beside another CPU job (the reference char-LSTM), under
different thread settings, in one run.

For each setting: the wall time of `rnngen train tinyshakespeare --max-steps STEPS --quiet` alone, then the wall
times of it and of `ref_charlstm.py --steps REF_STEPS` started together. The targets (issue 17): beside the
neighbour, each at most 2.5x its time alone; alone, within 5% of the default's time.

    python benchmarks/busy_machine.py                    # the settings below
    python benchmarks/busy_machine.py --steps 60 --ref-steps 60 --settings default,spin1000   # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save, shared_path  # noqa: E402

# Environment of the rnngen process for each setting (the neighbour always runs with the defaults).
SETTINGS = {
    "default": {"RNNGEN_THREADS": "keep"},  # rnngen leaves OpenMP as it is
    "rnngen": {},  # what rnngen sets by itself (see rnngen/runtime.py: quiet_threads)
    "spin0": {"RNNGEN_THREADS": "keep", "GOMP_SPINCOUNT": "0"},
    "spin10k": {"RNNGEN_THREADS": "keep", "GOMP_SPINCOUNT": "10000"},
    "one_thread": {"RNNGEN_THREADS": "keep", "OMP_NUM_THREADS": "1"},
}


def rnngen_command(corpus: Path, out: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "rnngen", "train", str(corpus), "--out", str(out), "--max-steps", str(steps),
            "--eval-every", str(steps), "--eval-max-tokens", "8192", "--preset", "plain", "--quiet"]


def timed(command: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(command, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    proc.started = time.perf_counter()  # type: ignore[attr-defined]
    return proc


def wait(proc: subprocess.Popen[bytes]) -> float:
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(err.decode()[-1000:])
    return time.perf_counter() - proc.started  # type: ignore[attr-defined]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--ref-steps", type=int, default=150)
    p.add_argument("--settings", default=",".join(SETTINGS))
    a = p.parse_args()
    corpus = shared_path("data", "tinyshakespeare.txt")
    ref = [sys.executable, str(shared_path("bench", "ref_charlstm.py")), str(corpus), "--steps", str(a.ref_steps)]
    ref_alone = wait(timed(ref, {}))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(a.settings.split(",")):
            env = SETTINGS[name]
            alone = wait(timed(rnngen_command(corpus, Path(tmp) / f"a{i}", a.steps), env))
            ours = timed(rnngen_command(corpus, Path(tmp) / f"b{i}", a.steps), env)
            neighbour = timed(ref, {})
            beside, neighbour_beside = wait(ours), wait(neighbour)
            rows.append({"setting": name, "env": env, "alone_s": round(alone, 1), "beside_s": round(beside, 1),
                         "slowdown": round(beside / alone, 2), "neighbour_s": round(neighbour_beside, 1),
                         "neighbour_slowdown": round(neighbour_beside / ref_alone, 2)})
            print(json.dumps(rows[-1]), flush=True)
    print(f"saved {save('busy_machine', {'steps': a.steps, 'ref_steps': a.ref_steps, 'ref_alone_s': round(ref_alone, 1), 'rows': rows})}")


if __name__ == "__main__":
    main()
