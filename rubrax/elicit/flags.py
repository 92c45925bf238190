"""The endpoint flags shared by every command that calls an OpenAI-compatible endpoint
(`rubrax rubrics ...`, `rubrax eval ...`, `rubrax generate`), their ClientConfig, and the
end-of-job summary line. A workflow-level module, so library modules that register their
own sub-command (rubrax.generate) need not import an entry point.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "rubrax", "chat")


def add_client_args(p: argparse.ArgumentParser, *, model: bool = True) -> None:
    """The endpoint flags every job shares; `model=False` when the caller defines its own --model."""
    g = p.add_argument_group("endpoint")
    if model:
        g.add_argument("--model", required=True, help="model name at the endpoint")
    g.add_argument("--base-url", default=None, help="OpenAI-compatible base URL (default: $OPENAI_BASE_URL or api.openai.com)")
    g.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    g.add_argument("--concurrency", type=int, default=16, help="requests in flight at most")
    g.add_argument("--timeout", type=float, default=120.0, help="seconds per attempt")
    g.add_argument("--max-retries", type=int, default=6)
    g.add_argument("--cache-dir", default=DEFAULT_CACHE)
    g.add_argument("--no-json-mode", action="store_true", help="do not ask the server for JSON output")
    g.add_argument("--price-in", type=float, default=None, help="US$ per million input tokens (for the cost summary)")
    g.add_argument("--price-out", type=float, default=None, help="US$ per million output tokens")
    g.add_argument("--transport", choices=("aiohttp", "sdk"), default="aiohttp")
    g.add_argument("--templates", default=None, help="directory of prompt templates overriding the package's")
    g.add_argument("--workers", type=int, default=None, help="items in progress at once (default: 2 x concurrency)")
    g.add_argument("--no-progress", action="store_true")


def client_config(args: argparse.Namespace, model: str | None = None) -> Any:
    from rubrax.elicit.client import ClientConfig

    prices = None
    if args.price_in is not None or args.price_out is not None:
        prices = (args.price_in or 0.0, args.price_out or 0.0)
    return ClientConfig(
        model=model or args.model, base_url=args.base_url, api_key_env=args.api_key_env, concurrency=args.concurrency,
        timeout_s=args.timeout, max_retries=args.max_retries, cache_dir=args.cache_dir, json_mode=not args.no_json_mode,
        price_per_mtok=prices, transport=args.transport,
    )


def print_summary(command: str, line: str, *clients: Any) -> None:
    """The end-of-job summary on stderr: the job's counts, then each client's calls, cache hits, tokens, cost."""
    print(f"rubrax {command}: {line}", file=sys.stderr)
    for c in clients:
        print(f"  {c.config.model}: {c.stats.summary()}", file=sys.stderr)
