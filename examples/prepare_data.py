"""Tokenize a corpus once into memory-mapped train.bin / val.bin + meta.json, for train_lm.py --data.

  python examples/prepare_data.py --data ~/c4/en/ --tokenizer ~/t5/spiece.model --out ~/c4-t5/
  python examples/prepare_data.py --data book.txt --tokenizer tokenizer.json --out data/book/

--data is a text file, a folder of text files, .jsonl / .json.gz files with a "text" field (C4's
c4-train.*.json.gz and c4-validation.*.json.gz are recognised as the two splits), or a folder of
those. --tokenizer is "bytes", a Hugging Face tokenizer.json (or its folder), or a SentencePiece .model.
Tokenization runs in parallel processes; ids are uint16 when the vocabulary fits, else uint32.
Nothing is downloaded.
"""

import json
import os
import pathlib
import signal
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from lm import config as config_lib
from lm import data as data_lib
from lm import files
from lm import prepare as prepare_lib
from lm import tokenizer as tokenizer_lib


def main(argv: list[str] | None = None) -> dict:
    p = config_lib.parser(__file__, __doc__)
    p.add_argument("--data", default=None, help="source: file or folder (see above); default the built-in corpus")
    p.add_argument("--tokenizer", default="bytes", help="bytes, a tokenizer.json (or its folder), or a .model")
    p.add_argument("--out", required=True, help="folder to write train.bin, val.bin and meta.json into")
    p.add_argument("--val-fraction", type=float, default=0.05, help="share held out when no split is given")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="tokenizing processes")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error(f"--workers must be >= 1, got {args.workers}")
    if args.data is not None and not pathlib.Path(args.data).expanduser().exists():
        p.error(f"--data {args.data}: no such file or folder")
    previous = signal.signal(signal.SIGTERM, _interrupt)  # a kill, like a Ctrl-C, removes the unfinished output
    try:
        _, sources, _ = prepare_lib.source_files(args.data)
        # Each byte of text is at most one token of 2 bytes (4 for vocabularies beyond 65,536).
        files.check_folder(args.out, "--out", need_bytes=2 * sum(f.stat().st_size for f in sources), create=False)
        meta = prepare_lib.prepare(args.data, args.tokenizer, args.out, val_fraction=args.val_fraction,
                                workers=args.workers, progress=args.progress)  # fmt: skip
    except (data_lib.DataError, tokenizer_lib.TokenizerError, files.OutputError) as e:
        p.error(str(e))
    except OSError as e:  # the disk filled up or went away while writing: nothing was left behind
        p.error(f"--out {args.out}: writing failed ({e.strerror or e}); nothing was written")
    except KeyboardInterrupt:
        print(f"{p.prog}: interrupted; nothing was written to {args.out}", file=sys.stderr)
        sys.exit(130)
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(json.dumps({k: meta[k] for k in ("tokenizer", "vocab_size", "dtype", "splits", "split_rule")}, indent=1))
    print(f"wrote {args.out}/train.bin, val.bin, meta.json; train with: python examples/train_lm.py --data {args.out}")
    return meta


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    main()
