"""``steer features top|search|contrast|info``: inspect SAE features of a local model.

Examples::

    steer features top --sae runs/sae --text "I'm sorry, but I can't help with that." --json
    steer features search --sae runs/sae --example "*draws her sword*" --example "*grins*"
    steer features contrast --sae runs/sae --a moralizing.txt --b in_character.txt
    steer features info --sae runs/sae --feature 123 --corpus corpus.jsonl --label
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from typing import Any

from steer.errors import InvalidArgumentError
from steer.models import load_model
from steer.sae.corpus import read_corpus
from steer.sae.features import (
    auto_label,
    contrast,
    encode_texts,
    feature_info,
    search,
    top_features,
)
from steer.sae.loading import load_sae

SUBCOMMANDS = ("top", "search", "contrast", "info")


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Inspect SAE features.")
    sub = parser.add_subparsers(dest="action", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", default="smollm2-135m-instruct", help="offline name or path")
    common.add_argument("--dtype", default="float32")
    common.add_argument("--sae", required=True, help="SAE directory (cfg.json + weights)")
    common.add_argument("--allow-other-model", action="store_true")
    common.add_argument("-k", type=int, default=10, help="how many features to list")
    common.add_argument("--json", action="store_true", help="print JSON")

    top = sub.add_parser("top", parents=[common], help="top features of a text")
    top.add_argument("--text", required=True)
    top.add_argument("--per-token", action="store_true", help="top-k features of every token")

    found = sub.add_parser("search", parents=[common], help="features shared by example texts")
    found.add_argument("--example", action="append", default=[], help="an example text")
    found.add_argument("--examples", help="a .txt/.jsonl file of examples")

    versus = sub.add_parser("contrast", parents=[common], help="features separating two sets")
    versus.add_argument("--a", required=True, help=".txt/.jsonl file of set A")
    versus.add_argument("--b", required=True, help=".txt/.jsonl file of set B")
    versus.add_argument("--field-a", help="jsonl field for set A (e.g. moralizing)")
    versus.add_argument("--field-b", help="jsonl field for set B (e.g. in_character)")

    info = sub.add_parser("info", parents=[common], help="what one feature does")
    info.add_argument("--feature", type=int, required=True)
    info.add_argument("--corpus", help=".txt/.jsonl file for top snippets")
    info.add_argument("--snippets", type=int, default=5)
    info.add_argument("--label", action="store_true", help="auto-label with a chat model")
    info.add_argument("--labeller", help="chat model for --label (default: --model)")
    return parser


def _read_set(path: str, field_name: str | None, option: str) -> list[str]:
    if field_name is None:
        return read_corpus(path)
    texts = []
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get(field_name), str):
                raise InvalidArgumentError(
                    f"{path}:{number} has no text field {field_name!r}", field=option
                )
            texts.append(record[field_name])
    return texts


def main(argv: list[str], *, prog: str = "steer features", command: str = "features") -> int:
    args = _parser(prog).parse_args(argv)
    if args.k < 1:
        raise InvalidArgumentError("must be at least 1", field="k")
    handle = load_model(args.model, dtype=args.dtype)
    sae = load_sae(args.sae, handle, allow_other_model=args.allow_other_model)
    result: dict[str, Any] = {"model": handle.name, "sae": str(args.sae), "hook": sae.hook_name}
    if args.action == "top":
        if args.per_token:
            (encoded,) = encode_texts(handle, sae, [args.text], field_name="text")
            result["tokens"] = [
                {"token": token, "features": [{"feature": f, "activation": a} for f, a in top]}
                for token, top in zip(encoded.tokens, encoded.top_per_token(args.k), strict=True)
            ]
        result["features"] = [asdict(r) for r in top_features(handle, sae, args.text, args.k)]
    elif args.action == "search":
        examples = list(args.example) + (read_corpus(args.examples) if args.examples else [])
        if not examples:
            raise InvalidArgumentError("give --example or --examples", field="examples")
        result["features"] = [asdict(r) for r in search(handle, sae, examples, args.k)]
    elif args.action == "contrast":
        set_a = _read_set(args.a, args.field_a, "a")
        set_b = _read_set(args.b, args.field_b, "b")
        result["features"] = [asdict(r) for r in contrast(handle, sae, set_a, set_b, args.k)]
    else:
        corpus = read_corpus(args.corpus) if args.corpus else ()
        info = feature_info(
            handle, sae, args.feature, corpus=corpus, num_tokens=args.k, num_snippets=args.snippets
        )
        payload = asdict(info)
        if args.label:
            labeller = load_model(args.labeller, dtype=args.dtype) if args.labeller else handle
            payload["label"] = auto_label(labeller, info)
        result["feature"] = payload
    _print(result, as_json=args.json)
    return 0


def _print(result: dict[str, Any], *, as_json: bool) -> None:
    if as_json:
        json.dump(result, sys.stdout, indent=2, default=str)
        print()
        return
    print(f"{result['model']}  {result['hook']}  ({result['sae']})")
    for token in result.get("tokens", []):
        listing = ", ".join(f"{f['feature']}:{f['activation']:.2f}" for f in token["features"])
        print(f"  {token['token']!r:>16}  {listing}")
    for row in result.get("features", []):
        extra = ""
        if row.get("auroc") is not None:
            extra = f"  A {row['mean_activation']:.2f} vs B {row['mean_activation_b']:.2f}"
            extra += f"  AUROC {row['auroc']:.2f}"
        print(f"  feature {row['feature']:>6}  score {row['score']:+.3f}{extra}")
    feature = result.get("feature")
    if feature:
        print(f"  feature {feature['feature']}  decoder norm {feature['decoder_norm']:.3f}")
        if feature.get("label"):
            print(f"  label: {feature['label']}")
        print("  promotes:  " + ", ".join(repr(t) for t, _ in feature["promoted"]))
        print("  suppresses: " + ", ".join(repr(t) for t, _ in feature["suppressed"]))
        if feature.get("density") is not None:
            print(f"  fires on {100 * feature['density']:.2f}% of corpus tokens")
        for snippet in feature["top_snippets"]:
            print(f"  {snippet['activation']:7.2f}  {snippet['marked']!r}")
