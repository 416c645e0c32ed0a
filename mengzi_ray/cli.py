"""`mengzi-ray <command>`: thin entry points; each command calls one library function."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mengzi-ray", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="synthetic data → tiny captioner → metrics → a caption, in one process")
    demo.add_argument("--out", default="outputs/demo")
    demo.add_argument("--steps", type=int, default=1000)
    synthetic = commands.add_parser("synthetic", help="write the synthetic Chinese image-caption set")
    synthetic.add_argument("--out", required=True)
    synthetic.add_argument("--num-train", type=int, default=200)
    synthetic.add_argument("--num-val", type=int, default=40)
    synthetic.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from mengzi_ray.demo import main as demo_main

        return demo_main(args.out, args.steps)
    from mengzi_ray.datasets import write_synthetic_dataset

    ds = write_synthetic_dataset(args.out, num_train=args.num_train, num_val=args.num_val, seed=args.seed)
    print(f"wrote {ds.num_train} train + {ds.num_val} val images to {ds.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
