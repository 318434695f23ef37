"""The `tinkerd` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from tinkerd.config import default_data_dir
from tinkerd.model_store import DEFAULT_MODEL


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from tinkerd.api.app import create_app
    from tinkerd.core.service import Service
    from tinkerd.engine.client import InProcessEngine
    from tinkerd.model_store import ModelNotFoundError, record_served, resolve_model, seed_hf_cache

    data_dir = Path(args.data_dir).expanduser()
    data_dir.mkdir(parents=True, exist_ok=True)
    engines = {}
    for name in args.model or [DEFAULT_MODEL]:
        try:
            source = resolve_model(name, data_dir)
        except ModelNotFoundError as exc:
            print(f"tinkerd serve: {exc}", file=sys.stderr)
            return 1
        if source.name in engines:
            print(f"tinkerd serve: two --model arguments are both named {source.name!r}", file=sys.stderr)
            return 1
        if args.seed_hf_cache:
            seed_hf_cache(source)
        logging.info("loading %s from %s", source.name, source.path)
        kv_bytes = int(args.kv_cache_gb * 2**30) if args.kv_cache_gb else None
        engines[source.name] = InProcessEngine(source.name, source.path, device=args.device, kv_cache_bytes=kv_bytes)
        record_served(source, data_dir)  # so offline commands given only the name find this directory
    service = Service(data_dir, engines, session_timeout=args.session_timeout)
    keys = set(args.api_key) if args.api_key else None
    app = create_app(service, hold_seconds=args.long_poll_seconds, api_keys=keys)
    print(f"tinkerd serving {', '.join(engines)} on http://{args.host}:{args.port} (data: {data_dir})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_keep_alive=75)
    return 0


def _import_model(args: argparse.Namespace) -> int:
    from tinkerd.model_store import ModelNotFoundError, resolve_model, seed_hf_cache

    try:
        source = resolve_model(args.model, Path(args.data_dir).expanduser())
    except ModelNotFoundError as exc:
        print(f"tinkerd import-model: {exc}", file=sys.stderr)
        return 1
    seed_hf_cache(source)
    print(source.path)
    return 0


def _export_merged(args: argparse.Namespace) -> int:
    from tinkerd.export import AdapterError, export_merged

    try:
        out = export_merged(args.checkpoint, Path(args.out_dir).expanduser(), Path(args.data_dir).expanduser(),
                            model=args.model, dtype=args.dtype, force=args.force)
    except AdapterError as exc:
        print(f"tinkerd export merged: {exc}", file=sys.stderr)
        return 1
    print(out)
    return 0


def _import_adapter(args: argparse.Namespace) -> int:
    from tinkerd.export import AdapterError, import_adapter

    try:
        path = import_adapter(Path(args.peft_dir), Path(args.data_dir).expanduser(), model=args.model, name=args.name)
    except AdapterError as exc:
        print(f"tinkerd import-adapter: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tinkerd", description="A self-hosted server for the Tinker fine-tuning API.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the Tinker API and the OpenAI-compatible API")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    serve.add_argument("--data-dir", default=str(default_data_dir()),
                       help="state directory: models, checkpoints, metadata (default: $TINKERD_DATA_DIR or ~/.local/share/tinkerd)")
    serve.add_argument("--model", action="append", metavar="MODEL",
                       help="base model to serve: a local HF directory, a hub id, or NAME=DIR to serve the local "
                            "directory DIR under the public name NAME (e.g. Qwen/Qwen3-8B=/data/qwen3-8b), which "
                            f"clients pass as base_model; repeatable (default: {DEFAULT_MODEL})")
    serve.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    serve.add_argument("--kv-cache-gb", type=float, default=None,
                       help="memory each model's sampler may use for its KV cache, in GiB; requests beyond it wait, and one "
                            "that could never fit is refused (default: half the free GPU memory, or a quarter of the RAM)")
    serve.add_argument("--session-timeout", type=float, default=120.0,
                       help="seconds without heartbeat before a session's in-memory state is freed (default: 120)")
    serve.add_argument("--long-poll-seconds", type=float, default=25.0, help="how long retrieve_future holds (default: 25)")
    serve.add_argument("--api-key", action="append", help="accept only these keys (default: any tml- key); repeatable")
    serve.add_argument("--no-seed-hf-cache", dest="seed_hf_cache", action="store_false",
                       help="do not add the served models' tokenizers to the local Hugging Face cache under their names")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.set_defaults(func=_serve)

    imp = sub.add_parser("import-model", help="import (and cache) a base model without serving")
    imp.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                     help=f"as for `serve --model`: a local HF directory, a hub id, or NAME=DIR (default: {DEFAULT_MODEL})")
    imp.add_argument("--data-dir", default=str(default_data_dir()))
    imp.set_defaults(func=_import_model)

    export = sub.add_parser("export", help="export a checkpoint for other tools")
    export_sub = export.add_subparsers(dest="export_format", required=True)
    merged = export_sub.add_parser(
        "merged", help="write a full Hugging Face model with the adapter merged in (loadable by transformers)")
    merged.add_argument("checkpoint", help="a tinker:// path (looked up in --data-dir) or a PEFT adapter directory")
    merged.add_argument("out_dir", help="directory to write the merged model to")
    merged.add_argument("--data-dir", default=str(default_data_dir()), help="the server's state directory")
    merged.add_argument("--model", default=None,
                        help="base model (HF directory or name); default: the checkpoint's own base model")
    merged.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    merged.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    merged.set_defaults(func=_export_merged)

    imp_adapter = sub.add_parser(
        "import-adapter", help="bring a PEFT LoRA adapter in as a checkpoint (prints its tinker:// path)")
    imp_adapter.add_argument("peft_dir", help="directory with adapter_config.json + adapter_model.safetensors")
    imp_adapter.add_argument("--data-dir", default=str(default_data_dir()), help="the server's state directory")
    imp_adapter.add_argument("--model", default=None,
                             help="the served base model it is for (as given to `serve --model`); "
                                  "default: the adapter's base_model_name_or_path")
    imp_adapter.add_argument("--name", default=None, help="checkpoint name (default: imported)")
    imp_adapter.set_defaults(func=_import_adapter)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
