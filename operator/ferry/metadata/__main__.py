"""`python -m ferry.metadata --listen ADDR:PORT [...]`: the endpoint without the full CLI."""

from __future__ import annotations

import argparse

from ferry.metadata.server import run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ferry metadata", description=__doc__)
    parser.add_argument("--listen", default="127.0.0.1:8169", help="ADDR:PORT (default 127.0.0.1:8169)")
    parser.add_argument("--kubeconfig", default=None, help="kubeconfig file (default: in-cluster, $KUBECONFIG)")
    parser.add_argument("--context", default=None, help="kubeconfig context")
    parser.add_argument("--namespace", default=None, help="watch only this namespace (default: all)")
    parser.add_argument("--watch-timeout", type=int, default=300, help="seconds per watch request")
    args = parser.parse_args(argv)
    run(
        args.listen,
        kubeconfig=args.kubeconfig,
        namespace=args.namespace,
        context=args.context,
        watch_timeout_seconds=args.watch_timeout,
    )


if __name__ == "__main__":
    main()
