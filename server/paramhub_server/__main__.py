"""`python -m paramhub_server` runs `paramhub serve`."""

import sys

from paramhub_server.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
