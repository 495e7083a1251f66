import sys

from .cli import main

if __name__ == "__main__":  # guarded: `loracl bench --jobs` workers re-import the main module
    sys.exit(main())
