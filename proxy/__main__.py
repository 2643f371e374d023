"""`python -m proxy` runs the tlsedge command."""

from proxy.cli import main

main()
