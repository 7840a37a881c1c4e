"""`python -m paramhub_server [serve] ...` runs `paramhub serve` (the word "serve" may be given,
as in `torchrun --nproc-per-node 2 -m paramhub_server serve --port 50051`)."""

import sys

from paramhub_server.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    sys.exit(main(args if args[:1] == ["serve"] else ["serve", *args]))
