"""`python -m control.discovery`: the discovery service (same as `kubespan discovery-service`)."""

import sys

from control.discovery.service_cli import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m control.discovery"))
