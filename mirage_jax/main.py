"""big_vision-style entry point: `python -m mirage_jax.main --config=configs/x.py:tiny --workdir=W`.

Equivalent to `mirage train`; kept so launch scripts can run the trainer as a module.
"""

import sys

from mirage_jax import cli


def main(argv=None) -> int:
  return cli.main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
  sys.exit(main())
