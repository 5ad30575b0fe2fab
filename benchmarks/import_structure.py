"""Upward imports and import cycles, counted by tests/test_layers.py's walker, on a past
commit and on this tree (issue 12's "before and after").

    python benchmarks/import_structure.py --before <commit>

Packages that a commit had and the layer order no longer names are ranked where their
modules went (quant/, sparsity/ -> techniques; cache -> util). Writes
benchmarks/results/import_structure.json.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import test_layers  # noqa: E402

RETIRED = {"quant": test_layers.RANKS["techniques"], "sparsity": test_layers.RANKS["techniques"],
           "cache": test_layers.RANKS["util"]}


def count(package: Path) -> dict:
    test_layers.PACKAGE = package
    upward = test_layers.upward_imports()
    cycles = test_layers.import_cycles()
    return {"upward_import_statements": len(upward),
            "modules_importing_upward": sorted({line.split(":")[0] for line in upward}),
            "upward_imports": upward,
            "cycles": cycles}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", required=True)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "import_structure.json"))
    args = ap.parse_args()
    sha = subprocess.run(["git", "rev-parse", args.before], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.strip()
    archive = subprocess.run(["git", "archive", sha, "src"], cwd=ROOT, capture_output=True, check=True).stdout
    with tempfile.TemporaryDirectory() as tmp:
        tarfile.open(fileobj=io.BytesIO(archive)).extractall(tmp, filter="data")
        saved = dict(test_layers.RANKS)
        test_layers.RANKS.update(RETIRED)
        before = count(Path(tmp) / "src" / "slimformer")
        test_layers.RANKS.clear()
        test_layers.RANKS.update(saved)
    after = count(ROOT / "src" / "slimformer")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    payload = {"benchmark": "import_structure", "before": sha, "after": f"{head} (working tree)",
               "order": "see tests/test_layers.py RANKS (local imports included)",
               "counts": {"before": {"modules_importing_upward": len(before["modules_importing_upward"]),
                                     "upward_import_statements": before["upward_import_statements"],
                                     "cycles": len(before["cycles"])},
                          "after": {"modules_importing_upward": len(after["modules_importing_upward"]),
                                    "upward_import_statements": after["upward_import_statements"],
                                    "cycles": len(after["cycles"])}},
               "before_detail": before, "after_detail": after}
    Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
    print(json.dumps(payload["counts"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
