"""`python -m bench.minitron`: the Minitron table's command line."""
from bench.minitron.cli import main

main()
