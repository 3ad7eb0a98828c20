"""Writes the BoolQ questions of an LLM-Adapters commonsense directory as classification files.

    python -m scripts.boolq_questions --data_dir ../shared/data/commonsense --out runs/boolq_questions

``DIR/boolq/{train,test}.json`` become ``OUT/{train,test}.jsonl``, one ``{"text": question,
"label": 1 if the answer is true else 0}`` per line (``data.source=classification`` reads them).
"""

from __future__ import annotations

import argparse
import json
import pathlib

from dora_jax.data.classification import boolq_questions


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", required=True, help="directory holding boolq/train.json and boolq/test.json")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        records = boolq_questions(pathlib.Path(args.data_dir) / "boolq" / f"{split}.json")
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        share = sum(r["label"] for r in records) / len(records)
        print(f"{split}: {len(records)} questions, {share:.3f} true -> {out / f'{split}.jsonl'}")


if __name__ == "__main__":
    main()
