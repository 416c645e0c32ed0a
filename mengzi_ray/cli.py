"""`mengzi-ray <command> --config jobs/X.yaml [--set key=value ...]`: thin entry points.

Every job command validates its card (`config.COMMANDS`) and calls one library function; `ray job submit
--working-dir . -- mengzi-ray <command> ...` and a test calling the function directly run the same code.
Exit status: 0 done, 1 the job failed (`JobFailed` or an exception), 2 the card or the command line is invalid.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from mengzi_ray.config import COMMANDS, ConfigError, JobFailed, load_card


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mengzi-ray", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS.values():
        sub = commands.add_parser(command.name, help=command.help, description=command.help)
        sub.add_argument("--config", required=True, help="job card (YAML); see jobs/README.md")
        sub.add_argument(
            "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
            help="override a card field by dotted path, value parsed as YAML (repeatable)",
        )
        sub.add_argument("--check", action="store_true", help="validate the card, print it, and exit")
    demo = commands.add_parser("demo", help="the whole product on the embedded Ray with tiny synthetic data")
    demo.add_argument("--out", default="outputs/demo")
    demo.add_argument("--fast", action="store_true", help="a smoke run: a few training steps per stage")
    synthetic = commands.add_parser("synthetic", help="write the synthetic Chinese image-caption set")
    synthetic.add_argument("--out", required=True)
    synthetic.add_argument("--num-train", type=int, default=200)
    synthetic.add_argument("--num-val", type=int, default=40)
    synthetic.add_argument("--seed", type=int, default=0)
    synthetic.add_argument("--unique", action="store_true",
                           help="retrieval query set: sizes too, and every caption describes exactly one image")
    detector = commands.add_parser(
        "import-detector", help="a released maskrcnn_benchmark detector (VinVL) → a detector dir for extract",
        description="Convert scene_graph_benchmark's checkpoint + labelmap + config (and test_sg_net.py's trailing "
        "KEY VALUE overrides) into <out>/model.safetensors, labelmap.json, detector.yaml; see docs/detectors.md",
    )
    detector.add_argument("--format", default="maskrcnn_benchmark", choices=["maskrcnn_benchmark", "detectron2"])
    detector.add_argument("--weights", required=True, help=".pth checkpoint (local or s3://)")
    detector.add_argument("--labelmap", required=True, help="VG-SGG-dicts json (label_to_idx, attribute_to_idx)")
    detector.add_argument("--config", required=True, help="the sgg/maskrcnn yaml config")
    detector.add_argument("--out", required=True, help="detector dir to write (local or s3://)")
    detector.add_argument("overrides", nargs="*", metavar="KEY VALUE", help="yacs overrides, as test_sg_net.py")
    reference = commands.add_parser("config-reference", help="print the job-card reference (markdown)")
    reference.add_argument("--write", metavar="README", help="rewrite the generated block of this file instead")
    return parser


def run_command(name: str, config: str, overrides: list[str], check: bool = False) -> int:
    """Validate the card of `name` and run its job; returns the exit status."""
    command = COMMANDS[name]
    try:
        card = load_card(command.card_class(), config, overrides)
    except ConfigError as exc:
        print(f"mengzi-ray {name}: {exc}", file=sys.stderr)
        return 2
    if check:
        print(card.model_dump_json(indent=2))
        return 0
    try:
        summary = command.job_function()(card)
    except ConfigError as exc:
        print(f"mengzi-ray {name}: {exc}", file=sys.stderr)
        return 2
    except JobFailed as exc:
        print(f"mengzi-ray {name}: job failed: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary, ensure_ascii=False, indent=2, default=str))
    return 0


def _import_detector(args: argparse.Namespace) -> int:
    from mengzi_ray.features.detector_import import DetectorImportError, run_import_detector

    try:
        summary = run_import_detector(format=args.format, weights=args.weights, labelmap=args.labelmap,
                                      config=args.config, out=args.out, overrides=args.overrides)
    except DetectorImportError as exc:
        print(f"mengzi-ray import-detector: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, ensure_ascii=False, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    if args.command in COMMANDS:
        return run_command(args.command, args.config, args.overrides, args.check)
    if args.command == "demo":
        from mengzi_ray.demo import main as demo_main

        return demo_main(args.out, args.fast)
    if args.command == "import-detector":
        return _import_detector(args)
    if args.command == "config-reference":
        from mengzi_ray import config_reference

        if args.write:
            changed = config_reference.write(args.write)
            print(f"{args.write}: job-card reference {'updated' if changed else 'already current'}")
        else:
            print(config_reference.generate())
        return 0
    from mengzi_ray.synthetic import write_synthetic_dataset

    ds = write_synthetic_dataset(args.out, num_train=args.num_train, num_val=args.num_val, seed=args.seed,
                                 unique=args.unique)
    print(f"wrote {ds.num_train} train + {ds.num_val} val images to {ds.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
