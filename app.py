"""Photos to 3D: the Gradio app. `python app.py --help` lists the options.

Host and port come from --host/--port, else GRADIO_SERVER_NAME / GRADIO_SERVER_PORT, else
127.0.0.1:7860. On a Hugging Face Space this file is the entry point (README front matter).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
from typing import List, Optional


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Web app: photos of one object (+ masks + camera file) -> textured 3D model (GLB / OBJ).",
    )
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                        help="address to listen on; 0.0.0.0 for every interface (default: $GRADIO_SERVER_NAME or 127.0.0.1)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
                        help="port to listen on (default: $GRADIO_SERVER_PORT or 7860)")
    parser.add_argument("--share", action="store_true", help="also publish a temporary public *.gradio.live link")
    return parser.parse_args(argv)


def addresses(host: str, port: int) -> List[str]:
    """Where to open a server listening on ``host``, as lines to print: addresses a person can open.

    0.0.0.0 (every interface) is not one: it becomes localhost, plus this machine's name for the
    other machines of the network. Other hosts are printed as they are.
    """
    if host in ("0.0.0.0", "::", ""):
        lines = [f"* Open http://localhost:{port} in a browser on this machine"]
        name = socket.gethostname()
        if name and name != "localhost":
            lines.append(f"  or http://{name}:{port} from another machine of the network")
        return lines
    return [f"* Open http://{host}:{port} in a browser"]


def _log_to_console() -> None:
    """The app's own messages (ui.handlers: one line per refused run, tracebacks of real faults)."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    logger = logging.getLogger("photo3d")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if os.environ.get("SPACES_ZERO_GPU"):
        import spaces  # noqa: F401, PLC0415 (ZeroGPU patches torch when imported: before torch loads)
    # Imported after parsing so that --help answers at once (gradio and torch load slowly).
    from pipeline.memory import limit_heap_arenas  # noqa: PLC0415
    from ui.layout import build_app  # noqa: PLC0415

    limit_heap_arenas()  # before the server's threads: see pipeline/memory.py
    from pipeline.reconstruct import preload  # noqa: PLC0415

    _log_to_console()
    # pycolmap's import takes SIGTERM over: the handler below comes after. ZeroGPU lends CUDA only inside a job.
    preload(gpu=not os.environ.get("SPACES_ZERO_GPU"))

    app = build_app()
    # `docker stop` and Spaces send SIGTERM: leave through the same cleanup as Ctrl-C.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        # quiet: gradio would print the address it listens on (http://0.0.0.0:...), not one to open.
        app.launch(server_name=args.host, server_port=args.port, share=args.share, show_error=True, quiet=True,
                   prevent_thread_lock=True)
        print("\n".join(addresses(args.host, args.port)), flush=True)
        app.blocks.block_thread()
    finally:
        app.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
