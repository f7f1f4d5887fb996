"""Plain-average ensembles scored from stored member probabilities, one Markdown table.

Every member is a file written by ``benchmarks/model_table.py --save-probs DIR``: one model's
FER2013 PublicTest probabilities, 1-crop and 10-crop. An ensemble's row is the accuracy of the
equal-weight average of its members' probabilities, which is what a soft-voting ensemble with
equal weights (`fer-train ensemble --weights average`) computes, so rows can be measured for
models whose weights are no longer at hand.

    python benchmarks/ensemble_table.py results/publictest_probs \\
        --ensemble thesis=cnn3_kd,cnn5_kd,cnn7_kd,vgg19_kd,resnet18_kd,resnet34_kd \\
        --search 4

``--search K`` also lists the best subsets of up to K members by 10-crop accuracy. Choosing
members that way selects on PublicTest, as model selection does everywhere in this project;
PrivateTest stays withheld for an independent measurement.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.member_probs import MemberProbs, average_accuracy, load_member_probs  # noqa: E402


def load_members(paths: list[Path]) -> dict[str, MemberProbs]:
    """Member files by name; a folder stands for every ``*.safetensors`` file in it."""
    files: list[Path] = []
    for path in paths:
        files += sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    members: dict[str, MemberProbs] = {}
    for member in map(load_member_probs, files):
        if member.name in members:
            raise SystemExit(f"two member files are named {member.name!r}: "
                             f"{members[member.name].source} and {member.source}")
        members[member.name] = member
    if not members:
        raise SystemExit(f"no member files in {', '.join(map(str, paths))}")
    return members


def parse_ensemble(spec: str, members: dict[str, MemberProbs]) -> tuple[str, list[MemberProbs]]:
    """``name=a,b,c`` -> (name, [members a, b, c])."""
    name, sep, names = spec.partition("=")
    if not sep or not names:
        raise SystemExit(f"--ensemble {spec!r}: expected NAME=MEMBER,MEMBER,...")
    missing = [n for n in names.split(",") if n not in members]
    if missing:
        raise SystemExit(f"--ensemble {name}: no member file for {', '.join(missing)} "
                         f"(have: {', '.join(sorted(members))})")
    return name, [members[n] for n in names.split(",")]


def table_row(label: str, group: list[MemberProbs]) -> str:
    """One Markdown row: label, member count, 1-crop and 10-crop accuracy, member names."""
    one = average_accuracy(group, tta=False) * 100
    ten = average_accuracy(group, tta=True) * 100
    return f"| {label} | {len(group)} | {one:.2f} | {ten:.2f} | {', '.join(m.name for m in group)} |"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("members", nargs="+", type=Path, help="member files or folders of them")
    p.add_argument("--ensemble", action="append", default=[], metavar="NAME=A,B,...",
                   help="a named plain-average ensemble (repeatable)")
    p.add_argument("--search", type=int, default=0, metavar="K",
                   help="also list the best subsets of 2..K members by 10-crop accuracy")
    p.add_argument("--top", type=int, default=10, help="rows to list for --search")
    args = p.parse_args()

    members = load_members(args.members)
    first = next(iter(members.values()))
    print(f"FER2013 {first.split} ({len(first.labels)} faces, data {first.data_fingerprint[:12]}); "
          "plain average of member probabilities\n")
    print("| row | members | 1-crop % | 10-crop % | of |")
    print("|---|---|---|---|---|")
    for name, member in sorted(members.items()):
        print(table_row(name, [member]))
    for spec in args.ensemble:
        name, group = parse_ensemble(spec, members)
        print(table_row(f"**{name}**", group))
    if args.search > 1:
        ranked = sorted(
            (combo for k in range(2, min(args.search, len(members)) + 1)
             for combo in itertools.combinations(members.values(), k)),
            key=lambda combo: average_accuracy(list(combo), tta=True), reverse=True)
        for rank, combo in enumerate(ranked[:args.top], 1):
            print(table_row(f"search #{rank}", list(combo)))


if __name__ == "__main__":
    main()
