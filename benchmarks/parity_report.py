"""Prints the relative error of W_t - W_0 of fira/galore against FiraAdamW/GaLoreAdamW.

Runs every case of tests/test_reference_parity.py and prints the worst and median error per
optimizer. Needs torch 2.13.0 and the reference packages (see README's test command).

Run: python benchmarks/parity_report.py
"""

import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
import test_reference_parity as parity


def main() -> None:
    print(f"{'optimizer':>10} {'runs':>5} {'max rel err':>12} {'median':>10} {'worst case'}")
    for kind in ("fira", "galore"):
        errors = []
        for proj_type, scale, magnitude, wd in parity.CASES:
            w0, _ = parity._problem(magnitude)
            ours = parity._run_ours(kind, proj_type, scale, wd, magnitude)
            ref = parity._run_reference(kind, proj_type, scale, wd, magnitude)
            errors.append((parity._max_rel_error(ours, ref, w0), (proj_type, scale, magnitude, wd)))
        worst = max(errors)
        median = float(np.median([e for e, _ in errors]))
        print(f"{kind:>10} {len(errors):5d} {worst[0]:12.2e} {median:10.2e} {worst[1]}")


if __name__ == "__main__":
    main()
