#!/usr/bin/env python
"""Ask a trained VQA run (MedBLIP or BLIP-2) about an image: ranked answers with their scores, and the generated one.

    python launch/ask.py --checkpoint runs/vqa-psd --image scan.png --question "is there a lesion?"
    python launch/ask.py --checkpoint runs/vqa-psd --questions pairs.csv     # image,question rows (CSV or JSONL)
    python launch/ask.py --checkpoint runs/vqa-psd --serve --port 8000       # a local web page

The top-ranked answer is what launch/evaluate.py predicts for the question in rank mode (same code, same candidates:
the run's training answers, so the run's vqa.root must be readable, or set vqa.answer_list=FILE). Image paths in
PAIRS are relative to the PAIRS file's folder. Details: docs/ask.md.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from framework.cli import run_cli  # noqa: E402

IMAGE_COLUMNS = ("image", "image_name", "file", "path")
QUESTION_COLUMNS = ("question", "text")
MAX_PAIRS_BYTES = 64 * 1024 * 1024


def read_pairs(path: Path) -> list[tuple[Path, str]]:
    """A CSV (header with image and question columns) or JSONL ({"image", "question"} per line) -> (image, question)."""
    from recipes.common.ask import AskError

    if not path.is_file():
        raise AskError(f"--questions: file not found: {path}")
    if path.stat().st_size > MAX_PAIRS_BYTES:
        raise AskError(f"--questions: {path} is larger than {MAX_PAIRS_BYTES // 2**20} MB")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise AskError(f"--questions: {path} is not UTF-8 text (a CSV or JSONL of image,question)") from None
    rows: list[dict[str, Any]] = []
    if path.suffix.lower() in (".jsonl", ".json") or text.lstrip().startswith("{"):
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise AskError(f"--questions: {path} line {n} is not JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise AskError(f"--questions: {path} line {n}: expected an object with image and question")
            rows.append(row)
    else:
        csv.field_size_limit(MAX_PAIRS_BYTES)  # a long field is judged by the question check, not by csv
        try:
            rows = list(csv.DictReader(text.splitlines()))
        except csv.Error as e:
            raise AskError(f"--questions: {path} is not a readable CSV ({e})") from None
    if not rows:
        raise AskError(f"--questions: {path} holds no image,question rows")
    columns = set().union(*(r.keys() for r in rows)) - {None}
    image_col = next((c for c in IMAGE_COLUMNS if c in columns), None)
    question_col = next((c for c in QUESTION_COLUMNS if c in columns), None)
    if image_col is None or question_col is None:
        raise AskError(f"--questions: {path} needs an image column ({'/'.join(IMAGE_COLUMNS)}) and a question column "
                       f"({'/'.join(QUESTION_COLUMNS)}); found {', '.join(sorted(map(str, columns))) or 'none'}")
    out = []
    for n, r in enumerate(rows, 1):
        image, question = r.get(image_col), r.get(question_col)
        if not image or not str(image).strip():
            raise AskError(f"--questions: {path} row {n} has no image")
        file = path.parent / str(image).strip()
        if not file.is_file():  # every row is checked before the model loads, not after the first answers
            raise AskError(f"--questions: {path} row {n}: image not found: {file}")
        out.append((file, "" if question is None else str(question)))
    return out


def print_answer(answer: Any, image: str) -> None:
    """The human-readable form: the ranked answers and their scores, the generated one, evaluate.py's choice."""
    print(f"image: {image}")
    print(f"question: {answer.question}" + (f"  (read as: {answer.normalized_question})"
                                            if answer.normalized_question != answer.question else ""))
    width = max(len(r.answer) for r in answer.ranked)
    for i, r in enumerate(answer.ranked, 1):
        print(f"  {i:>2}. {r.answer:<{width}}  {r.score:10.4f}")
    print(f"generated: {answer.generated}")
    print(f"evaluate.py's answer ({answer.mode}): {answer.prediction}", flush=True)


def build_parser() -> argparse.ArgumentParser:
    """The command line of launch/ask.py."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a VQA run directory, a step_N directory or a weights file")
    parser.add_argument("--recipe", default=None, help="VQA recipe YAML (default: the run's own config.yaml)")
    parser.add_argument("--image", default=None, help="the image file to ask about")
    parser.add_argument("--question", default=None, help="the question, e.g. \"is there a lesion?\"")
    parser.add_argument("--questions", default=None, metavar="PAIRS",
                        help="CSV (image,question header) or JSONL of image/question pairs")
    parser.add_argument("--top", type=int, default=5, help="ranked answers to show (default 5)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per question instead")
    parser.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    parser.add_argument("--serve", action="store_true", help="serve the web page instead of asking once")
    parser.add_argument("--host", default="127.0.0.1",
                        help="--serve: address to listen on (default: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="--serve: port (0: any free port)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. vqa.root=data/vqa_rad")
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exit through parser.error (status 2) on a combination of options that asks nothing answerable."""
    if args.serve:
        if args.image or args.question or args.questions:
            parser.error("--serve takes no --image/--question/--questions: ask on the page")
    elif args.questions:
        if args.image or args.question:
            parser.error("give --questions PAIRS or --image and --question, not both")
    elif not args.image or args.question is None:
        parser.error("give --image FILE and --question TEXT (or --questions PAIRS, or --serve)")
    if args.top < 1:
        parser.error(f"--top must be >= 1, got {args.top}")
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be 0-65535, got {args.port}")


def ask(args: argparse.Namespace) -> int:
    """Answer the asked pairs (or serve the page) and return the exit status; AskError for a bad pair."""
    from recipes.common.ask import Asker, AskError

    if args.questions:  # checked before the model loads: a bad file fails in a second, not after a minute
        pairs = read_pairs(Path(args.questions))
    elif not args.serve:
        pairs = [(Path(args.image), args.question)]
        if not pairs[0][0].is_file():  # before the model loads
            raise AskError(f"image not found: {args.image}" if not pairs[0][0].exists() else
                           f"not a file: {args.image}")
    asker = Asker(args.checkpoint, recipe=args.recipe, overrides=args.overrides, device=args.device,
                  top=args.top)
    if args.serve:
        return serve(asker, args.host, args.port)
    batch = asker.cfg.vqa.eval_batch_size
    for start in range(0, len(pairs), batch):
        chunk = pairs[start:start + batch]
        for (image, _), answer in zip(chunk, asker.ask_many(chunk)):
            if args.json:
                print(json.dumps({"image": str(image), **answer.to_dict()}), flush=True)
            else:
                print_answer(answer, str(image))
    return 0


def serve(asker: Any, host: str, port: int) -> int:
    """Serve the web page for asker on host:port until interrupted; ValueError when the port cannot be had."""
    from recipes.common.ask_web import make_server

    try:
        server = make_server(asker, host, port)
    except OSError as e:
        raise ValueError(f"cannot listen on {host}:{port} ({e.strerror or e}): choose another --port") \
            from None
    bound_host, bound_port = server.server_address[:2]
    print(f"serving {asker.kind} VQA run {asker.checkpoint} on http://{bound_host}:{bound_port}/ (Ctrl-C stops)",
          flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    check_args(parser, args)
    return run_cli(lambda: ask(args))


if __name__ == "__main__":
    sys.exit(main())
