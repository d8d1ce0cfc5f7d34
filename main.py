"""The seeds' command line: `python main.py --model gpt2 --dataset ... --mode pretrain|sft ...`.

A thin entry point; the flags and what they do live in taxon.seeds_cli (`python main.py -h`).
"""

import sys
from pathlib import Path

try:
    from taxon.seeds_cli import main
except ImportError:  # run from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))
    from taxon.seeds_cli import main

if __name__ == "__main__":
    sys.exit(main())
