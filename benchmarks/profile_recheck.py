"""A profile's saved check (`mnemosyne profile -o PATH --check` on the GPU), predicted again by the
step-time model as it is now: how a change to the model moves the error on the GPU's held-out batches,
without the GPU. The measured times are the GPU's; only the predictions are new.

    PYTHONPATH=src python3 benchmarks/profile_recheck.py benchmarks/profiles/h200-llama-3-8b-serving.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mnemosyne.bench.profile import format_check, recheck
from mnemosyne.models.loaders import resolve_model
from mnemosyne.scheduler.latency_model import DEVICES, LatencyModel, Profile, Profiled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profile", help="a profile written with --check")
    parser.add_argument("--device", default="h200", choices=sorted(DEVICES), help="for collective costs only")
    args = parser.parse_args()
    profile = Profile.load(args.profile)
    saved = json.loads(Path(args.profile).read_text())["check"]
    latency = LatencyModel(Profiled(profile), resolve_model(profile.model).load_config(), DEVICES[args.device])
    report = recheck(profile, saved["batches"], latency, num_check=len(saved["batches"]))
    print("as measured:\n" + format_check(saved) + "\n\npredicted again by the current model:\n" + format_check(report))


if __name__ == "__main__":
    main()
