"""Train a byte-level BPE tokenizer on a corpus's training split, for prepare_data.py and train_lm.py.

  python examples/train_tokenizer.py --data ~/corpus/ --vocab-size 32000 --out ~/tok
  python examples/prepare_data.py --data ~/corpus/ --tokenizer ~/tok --out ~/corpus-bpe

--data is read as prepare_data.py reads it (a text file, a folder of them, .jsonl / .json.gz with a
"text" field, C4's shards; the default: the built-in corpus) and split by the same rule, so the
tokenizer never sees the validation split. Writes OUT/tokenizer.json (Hugging Face ``tokenizers``:
GPT-2's byte-level BPE, every byte in the vocabulary, "</s>" between documents). Nothing is downloaded.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from lm import config as config_lib
from lm import data as data_lib
from lm import files
from lm import prepare as prepare_lib
from lm import tokenizer as tokenizer_lib


def main(argv: list[str] | None = None) -> pathlib.Path:
    p = config_lib.parser(__file__, __doc__)
    p.add_argument("--data", default=None, help="source: file or folder (see above); default the built-in corpus")
    p.add_argument("--vocab-size", type=int, default=32000, help="tokens, special ones included (default: 32000)")
    p.add_argument("--val-fraction", type=float, default=0.05,
                   help="share held out when no split is given, as prepare_data.py (default: 0.05)")  # fmt: skip
    p.add_argument("--out", required=True, help="folder to write tokenizer.json into")
    args = p.parse_args(argv)
    if args.vocab_size < 258:  # the 256 bytes and the two special tokens
        p.error(f"--vocab-size must be >= 258 (256 bytes + <unk> + </s>), got {args.vocab_size}")
    if not 0 < args.val_fraction < 1:
        p.error(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
    try:
        root, sources, description = prepare_lib.source_files(args.data)
        out = files.check_folder(args.out, "--out", create=False)
        items, rule = prepare_lib.split_items(root, sources, args.val_fraction, builtin=args.data is None)
        texts = (text for split, text, _ in items if split == "train")
        with files.staged_folder(out) as staging:
            tok = tokenizer_lib.train_bpe(texts, args.vocab_size, staging / "tokenizer.json")
    except (data_lib.DataError, files.OutputError) as e:
        p.error(str(e))
    except OSError as e:
        p.error(f"--out {args.out}: writing failed ({e.strerror or e}); nothing was written")
    path = out / "tokenizer.json"
    print(f"{description}, train split ({rule}): vocabulary {tok.vocab_size:,} -> {path}")
    print(f"next: python examples/prepare_data.py --data {args.data or '(built-in corpus: omit --data)'} "
          f"--tokenizer {path} --out DIR")  # fmt: skip
    return path


if __name__ == "__main__":
    main()
